"""One small layer over fsspec: local paths and ``s3://`` URIs read and write the same way.

S3 credentials and endpoint come from the standard AWS environment and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for S3-compatible stores) or from a
:class:`StorageOptions` section. Secrets are ``SecretStr``: they never appear in a repr, a log line
or an MLflow param.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from functools import lru_cache
from typing import Any

import fsspec
from pydantic import SecretStr

from wsss_platform.config import Section


class StorageError(OSError):
    """An operation on a URI failed; the message names the URI."""


class StorageOptions(Section):
    endpoint_url: str | None = None
    key: SecretStr | None = None
    secret: SecretStr | None = None
    anon: bool = False

    def fs_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kw["endpoint_url"] = endpoint
        if self.key is not None:
            kw["key"] = self.key.get_secret_value()
        if self.secret is not None:
            kw["secret"] = self.secret.get_secret_value()
        if self.anon:
            kw["anon"] = True
        return kw


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme (``s3://b/x`` + ``y`` -> ``s3://b/x/y``)."""
    if scheme(base) == "file" and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


@lru_cache(maxsize=16)
def _filesystem(protocol: str, frozen_kwargs: tuple[tuple[str, Any], ...]) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol, **dict(frozen_kwargs))


def filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path within it) for ``uri``."""
    proto = scheme(uri)
    kwargs = (options or StorageOptions()).fs_kwargs() if proto in ("s3", "s3a") else {}
    if proto == "file":
        kwargs = {"auto_mkdir": True}
    fs = _filesystem("s3" if proto == "s3a" else proto, tuple(sorted(kwargs.items())))
    path = fs._strip_protocol(uri)
    return fs, path


def _wrap(uri: str, action: str, e: Exception) -> StorageError:
    return StorageError(f"{action} {uri} failed: {type(e).__name__}: {e}")


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except Exception as e:
        raise _wrap(uri, "reading", e) from e


def read_text(uri: str, options: StorageOptions | None = None) -> str:
    return read_bytes(uri, options).decode("utf-8")


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write ``data`` so that ``uri`` is either absent or complete, never half-written.

    Local files go to a temporary sibling and are renamed (atomic on POSIX); an S3 PUT is atomic.
    """
    fs, path = filesystem(uri, options)
    try:
        if scheme(uri) == "file":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)
    except Exception as e:
        raise _wrap(uri, "writing", e) from e


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    try:
        return fs.exists(path)
    except Exception as e:
        raise _wrap(uri, "checking", e) from e


def isdir(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    try:
        return fs.isdir(path)
    except Exception as e:
        raise _wrap(uri, "checking", e) from e


def list_names(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Base names of the files directly under ``uri`` (empty when it does not exist)."""
    fs, path = filesystem(uri, options)
    try:
        if not fs.exists(path):
            return []
        fs.invalidate_cache(path)
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except Exception as e:
        raise _wrap(uri, "listing", e) from e


def open_uri(uri: str, mode: str = "rb", options: StorageOptions | None = None):
    fs, path = filesystem(uri, options)
    try:
        return fs.open(path, mode)
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except Exception as e:
        raise _wrap(uri, "opening", e) from e


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    if scheme(uri) == "file":  # object stores have no directories to make
        os.makedirs(filesystem(uri, options)[1], exist_ok=True)


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a folder tree; absent is fine."""
    fs, path = filesystem(uri, options)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:
        raise _wrap(uri, "removing", e) from e


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None):
    """(pyarrow filesystem or None for local paths, path) for libraries that take pyarrow's
    filesystems (Ray Tune's experiment storage), built on the same fsspec settings."""
    if scheme(uri) == "file":
        return None, os.path.abspath(filesystem(uri, options)[1])
    import pyarrow.fs

    fs, path = filesystem(uri, options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path

"""One small layer over fsspec: local paths and ``s3://`` URIs read and write the same way.

S3 credentials and endpoint come from the standard AWS environment and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for S3-compatible stores) or from a
:class:`StorageOptions` section. Filesystems are never built with credentials in them: a config's
key and secret are put into the job's own environment (:func:`export_credentials`), where botocore
finds them. So no pickled filesystem (Tune and Train state, Ray task arguments) can carry a secret,
and workers resolve credentials from their own environment, credentials file or instance profile.

Remote reads and writes are retried with exponential backoff on transient errors (a storage
hiccup of a few seconds costs nothing); "not found" and "access denied" are answered at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import fsspec
from pydantic import Field, SecretStr

from wsss_platform.section import Section

log = logging.getLogger("wsss.storage")
R = TypeVar("R")

class StorageError(OSError):
    """An operation on a URI failed; the message names the URI."""


class StorageOptions(Section):
    endpoint_url: str | None = None
    key: SecretStr | None = None
    """Access key id. Prefer the environment or a credentials file: a key here is exported into the
    job's environment (never into a filesystem object, a log or an output)."""
    secret: SecretStr | None = None
    anon: bool = False
    retries: int = Field(5, ge=0, le=20)
    """Retries of a remote read or write after a transient error (connection refused, timeout, 5xx)."""
    retry_backoff_s: float = Field(0.5, ge=0.0, le=60.0)
    """First wait between retries; doubled each time, at most 8 s (5 retries ride through ~15 s)."""

    def fs_kwargs(self) -> dict[str, Any]:
        """s3fs arguments: the endpoint, never credentials (see :func:`export_credentials`)."""
        kw: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kw["endpoint_url"] = endpoint
        if self.anon:
            kw["anon"] = True
        return kw

    def has_credentials(self) -> bool:
        return self.key is not None or self.secret is not None


CREDENTIAL_ENV = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY"}
SECRET_ENV_PREFIXES = ("AWS_SECRET", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY")


def export_credentials(options: StorageOptions | None) -> bool:
    """Put a config's key and secret into this process's environment, where botocore finds them
    and where child processes (a private local Ray's workers) inherit them. Returns whether any
    were set. The caller decides whether the processes that need them can inherit them."""
    if options is None or not options.has_credentials():
        return False
    for field, var in CREDENTIAL_ENV.items():
        value = getattr(options, field)
        if value is not None:
            os.environ[var] = value.get_secret_value()
    _filesystem.cache_clear()
    return True


def without_secrets(options: StorageOptions | None) -> dict[str, Any]:
    """The options as plain data for other processes, credentials left out."""
    return (options or StorageOptions()).model_dump(mode="json", exclude={"key", "secret"})


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def absolute(uri: str) -> str:
    """A local path made absolute (against this process's working folder); other URIs as given."""
    return os.path.abspath(uri) if uri and "://" not in uri else uri


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


# Answers that a retry cannot change. Anything else from a remote store (connection refused or
# reset, timeouts, throttling, 5xx) is retried.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
              ValueError, TypeError)
_PERMANENT_CODES = ("NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "PreconditionFailed", "InvalidBucketName")


def _transient(e: Exception) -> bool:
    if isinstance(e, _PERMANENT):
        return False
    text = str(e)
    return not any(code in text for code in _PERMANENT_CODES)


def retrying(uri: str, fn: Callable[[], R], options: StorageOptions | None = None) -> R:
    """``fn()``, retried with exponential backoff while a remote store answers with transient errors.

    Local files are not retried: a full disk or a missing folder does not heal in seconds.
    """
    opts = options or StorageOptions()
    attempts = 1 + (opts.retries if scheme(uri) != "file" else 0)
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts - 1 or not _transient(e):
                raise
            wait = min(8.0, opts.retry_backoff_s * 2 ** attempt)
            log.warning("storage: %s on %s; retry %d/%d in %.1fs", type(e).__name__, uri, attempt + 1,
                        attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# Buckets seen to exist in this process: an absent object (an in-flight marker, an optional file)
# is then reported without asking about its bucket again on every check.
_BUCKETS_SEEN: set[str] = set()


def _missing(uri: str, fs: fsspec.AbstractFileSystem) -> StorageError:
    """'not found', naming the bucket when it is the bucket that is missing."""
    if scheme(uri) in ("s3", "s3a"):
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        if bucket not in _BUCKETS_SEEN:
            try:
                bucket_exists = fs.exists(bucket)
            except Exception:
                bucket_exists = True  # cannot tell: report the object
            if not bucket_exists:
                return StorageError(f"bucket {bucket!r} does not exist ({uri}); create it or fix the URI")
            _BUCKETS_SEEN.add(bucket)
    return StorageError(f"not found: {uri}")


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, options)
    try:
        return retrying(uri, lambda: fs.cat_file(path), options)
    except FileNotFoundError:
        raise _missing(uri, fs) from None
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
            _write_local(path, data)
        else:
            retrying(uri, lambda: fs.pipe_file(path, data), options)
    except FileNotFoundError as e:
        if scheme(uri) != "file":
            raise _missing(uri, fs) from None
        raise _wrap(uri, "writing", e) from e
    except Exception as e:
        raise _wrap(uri, "writing", e) from e


TMP_MARK = ".tmp-"


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def sweep_temporaries(uri: str) -> int:
    """Remove the ``*.tmp-*`` files a killed writer left under a local folder; returns how many.

    Object stores have none (a PUT is atomic). Call it only on a folder no other job writes to.
    """
    if scheme(uri) != "file" or not os.path.isdir(uri):
        return 0
    removed = 0
    for root, _dirs, files in os.walk(uri):
        for name in files:
            if TMP_MARK in name:
                try:
                    os.remove(os.path.join(root, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def create_exclusive(uri: str, data: bytes, options: StorageOptions | None = None) -> bool:
    """Write ``uri`` only if it does not exist; False when it does. Safe against a concurrent
    writer: ``O_EXCL`` locally, a conditional PUT (``If-None-Match: *``) on S3."""
    fs, path = filesystem(uri, options)
    if scheme(uri) == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        retrying(uri, lambda: fs.pipe_file(path, data, IfNoneMatch="*"), options)
        return True
    except Exception as e:
        if "PreconditionFailed" in str(e) or getattr(e, "errno", None) == errno.EEXIST or isinstance(e, FileExistsError):
            return False
        raise _wrap(uri, "creating", e) from e


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def _check(uri: str, fs: fsspec.AbstractFileSystem, answer: bool) -> bool:
    """An absent object in an absent bucket is an error that says so, not a quiet False."""
    if not answer and scheme(uri) in ("s3", "s3a"):
        err = _missing(uri, fs)
        if str(err).startswith("bucket "):
            raise err
    return answer


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    try:
        answer = retrying(uri, lambda: fs.exists(path), options)
    except Exception as e:
        raise _wrap(uri, "checking", e) from e
    return _check(uri, fs, answer)


def isdir(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, options)
    try:
        answer = retrying(uri, lambda: fs.isdir(path), options)
    except Exception as e:
        raise _wrap(uri, "checking", e) from e
    return _check(uri, fs, answer)


def list_names(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Base names of the files directly under ``uri`` (empty when it does not exist)."""
    fs, path = filesystem(uri, options)

    def ls() -> list[str]:
        if not fs.exists(path):
            return []
        fs.invalidate_cache(path)
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

    try:
        return retrying(uri, ls, options)
    except Exception as e:
        raise _wrap(uri, "listing", e) from e


def _version(entry: dict[str, Any]) -> str:
    """What changes when an object's content does: S3's ETag, else the modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if entry.get(key) is not None:
            return str(entry[key]).strip('"')
    return ""


def info(uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """``{"size", "version"}`` of one file (version: ETag or mtime), for fingerprints of inputs."""
    fs, path = filesystem(uri, options)
    try:
        entry = retrying(uri, lambda: fs.info(path), options)
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except Exception as e:
        raise _wrap(uri, "checking", e) from e
    return {"size": int(entry.get("size") or 0), "version": _version(entry)}


def list_info(uri: str, options: StorageOptions | None = None) -> dict[str, tuple[int, str]]:
    """Base name -> (size, version) of the files directly under ``uri`` (empty when it does not exist):
    one listing, however many files (S3 pages it by 1,000)."""
    fs, path = filesystem(uri, options)

    def ls() -> dict[str, tuple[int, str]]:
        if not fs.exists(path):
            return {}
        fs.invalidate_cache(path)
        return {posixpath.basename(e["name"].rstrip("/")): (int(e.get("size") or 0), _version(e))
                for e in fs.ls(path, detail=True)}

    try:
        return retrying(uri, ls, options)
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

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=True)

    try:
        retrying(uri, rm, options)
    except FileNotFoundError:
        pass
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

import os

import pytest
from pydantic import SecretStr

from wsss_platform import storage
from wsss_platform.storage import StorageError, StorageOptions


def test_local_write_is_atomic_and_listable(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert os.listdir(tmp_path / "a") == ["b.bin"]  # no temporary left behind
    assert storage.list_names(str(tmp_path / "a")) == ["b.bin"]
    assert storage.list_names(str(tmp_path / "nothing")) == []


def test_s3_round_trip_and_errors_name_the_uri(s3_bucket):
    uri = f"{s3_bucket}/x/y.txt"
    storage.write_text(uri, "hi")
    assert storage.read_text(uri) == "hi"
    assert storage.exists(uri) and storage.list_names(f"{s3_bucket}/x") == ["y.txt"]
    with pytest.raises(StorageError, match=f"not found: {s3_bucket}/x/missing"):
        storage.read_bytes(f"{s3_bucket}/x/missing")
    with pytest.raises(StorageError, match="s3://no-such-bucket-here/k"):
        storage.write_text("s3://no-such-bucket-here/k", "v")


def test_secrets_are_never_shown_nor_put_into_filesystems(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    opts = StorageOptions(key=SecretStr("AKIAVERYSECRET"), secret=SecretStr("s3cr3t"))
    assert "AKIAVERYSECRET" not in repr(opts) and "s3cr3t" not in str(opts.model_dump())
    # A filesystem object is pickled by Tune/Train/Data: it never holds the credentials ...
    assert "key" not in opts.fs_kwargs() and "secret" not in opts.fs_kwargs()
    assert "s3cr3t" not in str(storage.without_secrets(opts))
    # ... which reach botocore (and a private local Ray's workers) through the job's environment.
    assert storage.export_credentials(opts)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAVERYSECRET" and os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"

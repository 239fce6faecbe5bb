"""Who an output belongs to: the settings that shaped it, and the one job writing it now.

An output holds the fingerprint of the settings that shape its results; a rerun with other
settings is refused naming the changed keys (DESIGN.md: "never mixed in"). A lock object with a
lease keeps a second job off an output while one runs. It is created with an exclusive write
(``O_EXCL`` locally, a conditional PUT on S3), renewed by a background thread, and taken over once
its lease has run out, or at once when its holder ran on this machine and its process is gone, so
a killed job's lock does not block the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from wsss_platform import storage
from wsss_platform.config import ConfigError, flatten
from wsss_platform.storage import StorageOptions

log = logging.getLogger("wsss.ownership")
LOCK_NAME = ".wsss-lock.json"


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def refuse_changed(output: str, old: dict[str, Any], new: dict[str, Any], what: str) -> None:
    changed = changed_keys(old, new)
    shown = ", ".join(f"{k} ({flatten(old).get(k)!r} -> {flatten(new).get(k)!r})" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise ConfigError(f"{output} holds {what} made with other settings (changed: {shown or 'settings'}{more}); "
                      "write to a new --output, or pass --overwrite to redo it there")


class OutputBusy(ConfigError):
    """Another job holds the output's lock."""


def _dead_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this machine and its process is gone (a killed job): no need to wait out
    its lease. A holder on another machine can only be judged by its lease."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class OutputLock:
    """A lease on ``<output>/.wsss-lock.json`` for the life of one job (a context manager)."""

    def __init__(self, output: str, options: StorageOptions | None, job: str, lease_s: float = 60.0) -> None:
        self.uri = storage.join(output, LOCK_NAME)
        self.output, self.options, self.job, self.lease_s = output, options, job, lease_s
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed_at": now, "expires_at": now + self.lease_s}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.uri, self.options))
        except storage.StorageError:
            return None
        except ValueError:
            return {"expires_at": 0}  # unreadable: treat as expired

    def acquire(self) -> None:
        for _ in range(3):
            if storage.create_exclusive(self.uri, self._record(), self.options):
                self._thread = threading.Thread(target=self._renew, name="wsss-output-lock", daemon=True)
                self._thread.start()
                return
            holder = self._holder()
            if holder is None:
                continue  # released in between
            if holder.get("expires_at", 0) > time.time() and not _dead_here(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("renewed_at", 0)))
                until = time.strftime("%H:%M:%S", time.localtime(holder["expires_at"]))
                raise OutputBusy(
                    f"{self.output} is in use by another {holder.get('job', 'wsss')} job (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, lease renewed {since}); wait for it to finish, or write to another "
                    f"--output. If that job is dead, its lease ends at {until} and the output is free again.")
            log.warning("taking over %s from %s job pid %s (its lease ran out, or its process is gone)", self.uri,
                        holder.get("job"), holder.get("pid"))
            storage.remove(self.uri, self.options)
        raise OutputBusy(f"{self.output}: could not take the lock {self.uri}; another job is starting there")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                storage.write_bytes(self.uri, self._record(), self.options)
            except storage.StorageError as e:  # the job goes on; a long outage may let the lease lapse
                log.warning("could not renew the lock %s: %s", self.uri, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            holder = self._holder()
            if holder is not None and holder.get("owner") == self.owner:
                storage.remove(self.uri, self.options)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except storage.StorageError as e:
            log.warning("could not release the lock %s: %s (it expires by itself)", self.uri, e)

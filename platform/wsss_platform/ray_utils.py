"""Connecting to Ray: a cluster when an address is given (or RAY_ADDRESS), else a local Ray on loopback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


LOOPBACK_ENV = {
    # Ray resolves 127.0.0.1 to the machine's external address unless "clusters" are off; a
    # single-machine Ray needs no external address, so keep all its traffic on loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Token auth guards `ray start` clusters; a private local instance has nothing to guard.
    "RAY_AUTH_MODE": "disabled",
}


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a private local Ray on loopback."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)  # read by ray at import time, and by its child processes
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", include_dashboard=False, **kwargs)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def code_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("wsss-platform")
    except PackageNotFoundError:
        pkg = "unknown"
    commit = "unknown"
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_path = REPO_ROOT / ".git" / ref[5:]
            commit = ref_path.read_text().strip() if ref_path.exists() else commit
        else:
            commit = ref
    except OSError:
        pass
    return {"package": pkg, "git_commit": commit}

"""Connecting to Ray: a cluster when an address is given (or RAY_ADDRESS), else a local Ray on loopback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        # The embedded default: everything on 127.0.0.1, no dashboard (nothing to submit to).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **kwargs)


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

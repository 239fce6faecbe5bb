"""Connecting to Ray: a cluster when an address is given (or RAY_ADDRESS), else a local Ray on loopback."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsss_platform.storage import StorageOptions

REPO_ROOT = Path(__file__).resolve().parents[2]


LOOPBACK_ENV = {
    # Ray resolves 127.0.0.1 to the machine's external address unless "clusters" are off; a
    # single-machine Ray needs no external address, so keep all its traffic on loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Token auth guards `ray start` clusters; a private local instance has nothing to guard.
    "RAY_AUTH_MODE": "disabled",
}


def init_ray(address: str | None = None, storage: StorageOptions | None = None, **kwargs: Any) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a private local Ray on loopback.

    Credentials in a config's ``storage`` section reach workers only by inheritance: they are in
    this process's environment (``storage.export_credentials``) and a private local Ray's workers
    are its children. Ray's runtime envs would write them into its logs, so they are never used
    for that; a job on an existing cluster with credentials in its config is refused instead.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)  # read by ray at import time, and by its child processes
    import ray

    check_credentials_reach_workers(address, storage)
    if ray.is_initialized():
        return
    from wsss_platform.console import only_our_worker_lines, verbose

    if not verbose():
        kwargs.setdefault("logging_level", "WARNING")
    if address:
        ray.init(address=address, **kwargs)
    else:
        kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", **kwargs)
    only_our_worker_lines()


def state_api_error(timeout: float = 10) -> str | None:
    """Why Ray's State API (served by the dashboard) does not answer a Ray worker, or None when it does.

    Asked from a worker, not the driver: that is where Ray Train's placement-group cleaner asks it.
    """
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def ask() -> str | None:
        from ray.util.state import list_actors

        try:
            list_actors(limit=1, timeout=timeout, raise_on_missing_output=False)
        except Exception as e:  # any failure means the same: no State API to rely on
            return f"{type(e).__name__}: {e}"
        return None

    return ray.get(ask.remote())


def check_credentials_reach_workers(address: str | None, storage: StorageOptions | None) -> None:
    """Refuse config credentials that a job's workers could not inherit (see :func:`init_ray`)."""
    if storage is None or not storage.has_credentials():
        return
    import ray

    if address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        from wsss_platform.config import ConfigError

        raise ConfigError(
            "dataset.storage.key/secret are set in the config, but the job runs on a Ray cluster that is "
            "already running, whose workers cannot inherit them (and Ray would log them if they were sent). "
            "Give the cluster's nodes credentials (AWS_* environment, a credentials file or profile, an "
            "instance role, a Kubernetes Secret) and remove them from the config")


def record_items(ds, ids: list[str], blocks: int | None = None):
    """``ids`` of ``ds`` as a Ray Dataset of ``{"image_id", "record"}`` rows (``blocks`` of them, by
    default up to 64): each row carries what its worker needs to load the image
    (``datasets.RecordReader``), so no worker opens the annotations."""
    import ray

    items = [{"image_id": i, "record": r} for i, r in zip(ids, ds.records(ids), strict=True)]
    return ray.data.from_items(items, override_num_blocks=blocks or max(1, min(len(ids), 64)))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def code_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("wsss-platform")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"package": pkg, "git_commit": _git_commit()}


def _git_commit() -> str:
    # git itself knows worktrees, packed refs and detached heads; reading .git by hand is only the
    # fallback for images that ship the checkout without a git binary.
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()):
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        ref = (REPO_ROOT / ".git" / "HEAD").read_text().strip()
        if not ref.startswith("ref: "):
            return ref
        ref_path = REPO_ROOT / ".git" / ref[5:]
        return ref_path.read_text().strip() if ref_path.exists() else "unknown"
    except OSError:
        return "unknown"


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune from copying the driver's AWS credentials into every trial's runtime env.

    Tune 2.60 puts ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/session tokens into the
    ``env_vars`` of each trainable actor (``ray.tune.execution.class_cache``), and Ray writes
    runtime envs into its session logs. Trials need no copy: on a private local Ray they inherit
    the driver's environment, and on a cluster each node has its own credentials. There is no
    option for this in Tune, so the list it reads is trimmed once, here.
    """
    from ray.tune.execution import class_cache

    from wsss_platform.storage import SECRET_ENV_PREFIXES

    for name in list(class_cache.ENV_VARS_TO_PROPAGATE):
        if name.startswith(SECRET_ENV_PREFIXES):
            class_cache.ENV_VARS_TO_PROPAGATE.discard(name)

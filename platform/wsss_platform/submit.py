"""Submitting jobs to a running Ray cluster through the Job Submission API.

The repository is shipped as the job's runtime env (``working_dir``, with ``wsss_core`` and
``wsss_platform`` as ``py_modules``), so a cluster needs only the dependencies in its image.
Only non-secret environment is forwarded (endpoints, tracking URI); credentials come from the
cluster's own environment or IAM role.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any

from wsss_platform.ray_utils import REPO_ROOT

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
EXCLUDES = [".venv", ".git", "**/__pycache__", "mlartifacts", "mlruns", "mlflow.db", "demo-data", "demo-output",
            "*-output", ".pytest_cache", ".ruff_cache", ".whl", "*.egg-info", "label-output"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise ValueError(f"{address}: job submission talks to the dashboard, e.g. http://HEAD:8265, not a ray:// client address")
    return address if "://" in address else f"http://{address}"


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address))


def runtime_env() -> dict[str, Any]:
    import wsss_core
    import wsss_platform

    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {
        "working_dir": str(REPO_ROOT),
        "py_modules": [os.path.dirname(wsss_core.__file__), os.path.dirname(wsss_platform.__file__)],
        "excludes": EXCLUDES,
        "env_vars": env_vars,
    }


def refuse_secrets(args: list[str], config: str | None) -> None:
    """A submitted job's command line and config file are stored by the cluster and shown in its
    dashboard and logs: neither may carry a credential."""
    from wsss_platform.config import ConfigError, is_secret_override, mask_secrets, read_yaml

    secret = [a.split("=", 1)[0] for a in args if is_secret_override(a)]
    if config and mask_secrets(data := read_yaml(config)) != data:
        secret.append(f"a storage key or secret in {config}")
    if secret:
        raise ConfigError(
            f"{', '.join(secret)}: credentials are not sent with a submitted job (they would be stored in its "
            "command line, working dir and logs). Give the cluster's nodes credentials instead: AWS_* environment, "
            "a credentials file or profile, an instance role, or a Kubernetes Secret (README, section Data)")


def submit(kind: str, args: list[str], address: str | None, submission_id: str | None = None) -> str:
    """Submit ``jobs/<kind>.py ARGS`` to the cluster; returns the submission id."""
    entry = f"python jobs/{kind}.py {shlex.join(args)}"
    c = client(address)
    deadline = time.monotonic() + 60
    while True:
        try:
            return c.submit_job(entrypoint=entry, runtime_env=runtime_env(), submission_id=submission_id,
                                metadata={"wsss.job": kind})
        except RuntimeError as e:
            # A cluster that has just started answers 500 until its job agent is up.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait(job_id: str, address: str | None, timeout: float | None = None, follow: bool = False) -> str:
    c = client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    printed = 0
    while True:
        status = str(c.get_job_status(job_id).value)
        if follow:
            logs = c.get_job_logs(job_id)
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(1.0)

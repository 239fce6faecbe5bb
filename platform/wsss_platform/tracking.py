"""MLflow defaults: with no ``MLFLOW_TRACKING_URI`` runs go to ``./mlflow.db`` (sqlite).

MLflow 3's file store is deprecated, so the laptop default is a sqlite file in the working folder
with artifacts beside it in ``./mlartifacts``; ``wsss ui`` opens the MLflow UI over that same store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(workdir: str | Path | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(workdir or os.getcwd()).resolve() / DEFAULT_DB}"


def artifact_root(workdir: str | Path | None = None) -> str:
    return (Path(workdir or os.getcwd()).resolve() / DEFAULT_ARTIFACTS).as_uri()


def setup(experiment: str, workdir: str | Path | None = None) -> str:
    """Point MLflow at the tracking store and select ``experiment``; returns its id."""
    import mlflow

    uri = tracking_uri(workdir)
    # Decided before set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
    local_default = "MLFLOW_TRACKING_URI" not in os.environ and uri.startswith("sqlite:")
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        mlflow.set_experiment(experiment)
        return exp.experiment_id
    # A local sqlite store gets its artifacts in ./mlartifacts rather than MLflow's cwd default.
    location = artifact_root(workdir) if local_default else None
    exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_params_flat(params: dict[str, Any]) -> None:
    """Log a flat dict of params, in chunks (MLflow caps a batch at 100)."""
    import mlflow

    items = [(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))


def ui_command(host: str = "127.0.0.1", port: int = 5000, workdir: str | Path | None = None) -> list[str]:
    uri = tracking_uri(workdir)
    cmd = ["mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", artifact_root(workdir)]
    return cmd

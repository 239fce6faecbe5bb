"""MLflow defaults: with no ``MLFLOW_TRACKING_URI`` runs go to ``./mlflow.db`` (sqlite).

MLflow 3's file store is deprecated, so the laptop default is a sqlite file in the working folder
with artifacts beside it in ``./mlartifacts`` (any sqlite store keeps its artifacts in ``mlartifacts/``
beside its database file); ``wsss ui`` opens the MLflow UI over that same store.
"""

from __future__ import annotations

import json
import os
import sys
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
    """``mlartifacts/`` beside a sqlite store (MLflow's own default is ``./mlruns`` of whatever folder a
    job runs in, which ``wsss ui`` started elsewhere would not find)."""
    uri = tracking_uri(workdir)
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path(workdir or os.getcwd())
    return (folder.resolve() / DEFAULT_ARTIFACTS).as_uri()


def setup(experiment: str, workdir: str | Path | None = None) -> str:
    """Point MLflow at the tracking store and select ``experiment``; returns its id."""
    import mlflow

    from wsss_platform.console import quiet_mlflow

    quiet_mlflow()
    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        mlflow.set_experiment(experiment)
        return exp.experiment_id
    location = artifact_root(workdir) if uri.startswith("sqlite:") else None
    exp_id = mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def count_runs() -> int:
    """Runs in the tracking store (0 for an empty one)."""
    from mlflow.tracking import MlflowClient

    from wsss_platform.console import quiet_mlflow

    quiet_mlflow()
    client = MlflowClient(tracking_uri())
    ids = [e.experiment_id for e in client.search_experiments()]
    return sum(len(client.search_runs([i], max_results=1000)) for i in ids) if ids else 0


def ui_command(host: str = "127.0.0.1", port: int = 5000, workdir: str | Path | None = None) -> list[str]:
    uri = tracking_uri(workdir)
    # The running interpreter's mlflow: `wsss ui` works from any shell, its venv activated or not.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", artifact_root(workdir)]
    return cmd


UI_DEFAULT = "http://127.0.0.1:5000"
CLASSIC = "workflowType=machine_learning"
"""MLflow 3's UI opens experiments in its GenAI view unless the URL asks for the classic runs view."""


def ui_base() -> str:
    """Where a person opens the UI: the tracking server itself, else what ``wsss ui`` serves."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?{CLASSIC}"


def experiment_url(experiment_id: str) -> str:
    return f"{ui_base()}/#/experiments/{experiment_id}?{CLASSIC}"


class JobRun:
    """One MLflow run per job: opened when the work starts (so its duration is the job's), named
    and tagged for what it is, metrics logged while it runs, and closed FINISHED, FAILED (an
    exception, or :meth:`fail`) or KILLED (Ctrl-C, SIGTERM)."""

    def __init__(self, experiment: str, name: str, tags: dict[str, str], description: str = "",
                 params: dict[str, Any] | None = None, parent_run_id: str | None = None,
                 resume_run_id: str | None = None) -> None:
        self.experiment, self.name, self.description = experiment, name, description
        self.resume = resume_run_id
        self.tags = {k: str(v) for k, v in tags.items() if v is not None}
        self.params, self.parent = params or {}, parent_run_id
        self.status = "FINISHED"
        self.run_id = self.experiment_id = ""
        self.client: Any = None

    def __enter__(self) -> JobRun:
        from mlflow.tracking import MlflowClient

        self.experiment_id = setup(self.experiment)
        self.client = MlflowClient(tracking_uri())
        if self.resume and self._reopen(self.resume):
            return self
        tags = self.tags | ({"mlflow.note.content": self.description} if self.description else {})
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        run = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags)
        self.run_id = run.info.run_id
        items = [(k, "" if v is None else str(v)[:6000]) for k, v in self.params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in items[i:i + 100]])
        return self

    def _reopen(self, run_id: str) -> bool:
        """Continue an earlier run of the same job (a resumed training): RUNNING again, params kept."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted, or another tracking store: start a new run
            return False
        self.run_id = run.info.run_id
        self.client.update_run(self.run_id, status="RUNNING")
        self.client.set_tag(self.run_id, "wsss.resumed", "true")
        self.stale_error = "wsss.error" in run.data.tags
        return True

    stale_error = False
    """A resumed run carries the error of the attempt it continues; a successful end clears it."""

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.status = "KILLED" if issubclass(exc_type, KeyboardInterrupt | SystemExit) else "FAILED"
            self.client.set_tag(self.run_id, "wsss.error", f"{exc_type.__name__}: {exc}"[:5000])
        elif self.stale_error and self.status == "FINISHED":
            self.client.delete_tag(self.run_id, "wsss.error")
        self.client.set_terminated(self.run_id, status=self.status)

    @property
    def url(self) -> str:
        return run_url(self.experiment_id, self.run_id)

    def fail(self, reason: str) -> None:
        """End FAILED although no exception was raised (e.g. too many images failed)."""
        self.status = "FAILED"
        self.client.set_tag(self.run_id, "wsss.error", reason[:5000])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # NaN is no value
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_bytes(self, data: bytes, name: str, folder: str | None = None) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, name)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, path, folder)

    def log_table(self, columns: dict[str, list[Any]], name: str) -> None:
        import mlflow

        mlflow.log_table(columns, artifact_file=name, run_id=self.run_id)

    def log_split(self, split, context: str) -> None:
        """A dataset split (``uri``, ``split``, ``ids``) as an MLflow input (the run page's "Datasets"
        box), named ``<folder>/<split>`` and identified by its ids; ``context`` is what the job did with it."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from wsss_platform.ownership import fingerprint

        name = f"{os.path.basename(split.uri.rstrip('/'))}/{split.split}"
        digest = fingerprint({"uri": split.uri, "split": split.split, "ids": split.ids})
        ds = Dataset(name=name, digest=digest, source_type="wsss", source=json.dumps({"uri": split.uri}))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", context)])])


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)

"""The sweep's MLflow parent run: opened (or reopened on resume) before the trials, finished with the
best params, counts, the trials table, Optuna's plots and the best trial's preview."""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from wsss_platform.ray_utils import code_version
from wsss_platform.sweep.config import Dim, SweepConfig
from wsss_platform.sweep.search import space_size
from wsss_platform.sweep.state import SweepSummary


def mlflow_parent(cfg: SweepConfig, out: str, state: dict[str, Any], n_images: int, n_trials: int) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    from wsss_platform import tracking

    exp_id = tracking.setup(cfg.tracking.experiment)
    client = MlflowClient(tracking.tracking_uri())
    run_id = state.get("parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if run_id:
        client.update_run(run_id, status="RUNNING")
        # Child runs of trials that were running when the sweep stopped: Tune reruns those trials
        # under new runs, so the stale ones are closed rather than left "running" forever.
        for r in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"):
            client.set_terminated(r.info.run_id, status="KILLED")
        return client, run_id
    ds, training = cfg.job.dataset, cfg.train is not None
    data = f"{os.path.basename(ds.uri.rstrip('/'))}/{ds.split}"
    name = cfg.tracking.run_name or f"sweep {data} {'train ' if training else ''}{cfg.objective} ({n_trials} trials)"
    scored = f"val mIoU of a segmenter trained on {ds.uri}" if training else f"{n_images} images of {ds.uri}"
    desc = (f"Ray Tune + Optuna over {', '.join(cfg.search_space)}, scored on {scored}; best "
            f"{'training' if training else 'labeling'} config in {out}/best.yaml.")
    model = cfg.train.model.backbone if training else cfg.label.model.name
    tags = {"wsss.job": "sweep", "wsss.output": out, "wsss.dataset": ds.uri, "wsss.split": ds.split,
            "wsss.model": f"{model} ({cfg.job.model.pretrained})", "wsss.code_version": code_version()["git_commit"][:12],
            "mlflow.note.content": desc}
    if not training:
        tags |= {"wsss.cam_source": cfg.label.cam_source, "wsss.refiner": "+".join(cfg.label.refine) or "none"}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    params = {"objective": cfg.objective, "subset.num_images": n_images, "subset.seed": cfg.subset.seed,
              **{f"tune.{k}": v for k, v in cfg.tune.model_dump(mode="json").items()},
              "search_space": json.dumps(cfg.search_space)[:6000], "model": model,
              "dataset.uri": ds.uri, "dataset.split": ds.split}
    for k, v in params.items():
        client.log_param(run.info.run_id, k, "" if v is None else str(v))
    return client, run.info.run_id


def open_parent(cfg: SweepConfig, dims: list[Dim], out: str, state: dict[str, Any], n_images: int,
                 summary: SweepSummary, log) -> tuple[Any, str]:
    from wsss_platform import tracking

    trials = min(cfg.tune.num_trials, space_size(dims) or cfg.tune.num_trials)
    client, parent = mlflow_parent(cfg, out, state, n_images, trials)
    summary.parent_run_id = parent
    summary.parent_run_url = tracking.run_url(client.get_run(parent).info.experiment_id, parent)
    log(f"[wsss sweep] MLflow run: {summary.parent_run_url}")
    return client, parent


def finish_parent(client, run_id: str, summary: SweepSummary, rows: list[dict[str, Any]], dims: list[Dim],
                   mode: str, files: dict[str, bytes], log) -> None:
    import mlflow

    from wsss_platform.sweep.search import plot_study, study_from_trials

    metrics = {"trials_complete": summary.complete, "trials_stopped": summary.stopped,
               "trials_failed": summary.errored}
    if summary.best_value is not None:
        metrics["best_objective"] = summary.best_value
    # MLflow params are write-once: the best config becomes params only when the sweep is complete
    # (an interrupted sweep's best so far is in best.yaml and the trials table).
    if summary.best_value is not None and not summary.interrupted:
        for k, v in summary.best_params.items():
            client.log_param(run_id, f"best.{k}", str(v))
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
            client.log_artifact(run_id, os.path.join(d, name))
        done = [{"params": {k[6:]: v for k, v in r.items() if k.startswith("param:") and v is not None},
                 "value": r["objective"]} for r in rows
                if r["status"] == "complete" and r["objective"] is not None and not math.isnan(r["objective"])]
        if done:
            plots = plot_study(study_from_trials(done, dims, mode), os.path.join(d, "plots"))
            for name, path in plots.items():
                if name.startswith("skipped:"):
                    log(f"[wsss sweep] plot {name[8:]} not drawn: {path}")
                else:
                    client.log_artifact(run_id, path, "plots")
    if rows:
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        mlflow.log_table({k: [json.dumps(x) if isinstance(x, list | dict) else x for x in v] for k, v in columns.items()},
                         artifact_file="trials.json", run_id=run_id)

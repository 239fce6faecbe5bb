"""``wsss sweep``: Ray Tune + Optuna over CLIP-ES prompt and refinement settings (driver side).

subset of the split -> backbone features once (a Ray task with a trial's resources) -> Tune runs
trials (OptunaSearch with seeded TPE, ASHA on the chunked mIoU) that reuse the cached features and
the CAMs of their prompt setting -> best config to ``<output>/best.yaml``, a trials table and
Optuna's plots. MLflow: one parent run for the sweep, one child run per trial.

An interrupted sweep (Ctrl-C, ``wsss jobs stop``, a lost driver) resumes when the same command runs
again: Tune restores the experiment from ``<output>/tune`` and finishes the budget without
rerunning finished trials.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import torch
import yaml

from wsss_platform import storage
from wsss_platform.config import ConfigError, build_config
from wsss_platform.console import quiet_ray
from wsss_platform.datasets import open_dataset
from wsss_platform.datasets.base import DatasetError
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import _dataset_payload
from wsss_platform.label.stages import check_model_paths, device_for
from wsss_platform.ownership import OutputLock, fingerprint, refuse_changed
from wsss_platform.ray_utils import (
    check_credentials_reach_workers,
    cluster_gpus,
    code_version,
    init_ray,
    keep_credentials_out_of_runtime_envs,
)
from wsss_platform.sweep import cache
from wsss_platform.sweep.config import Dim, SweepConfig, apply_params, resolve_params
from wsss_platform.sweep.search import searcher, space_size
from wsss_platform.sweep.trial import TrialContext

EXPERIMENT = "sweep"
RESULT_FILES = ("cache", "tune", "sweep.json", "best.yaml", "trials.csv", "plots")


@dataclass
class SweepSummary:
    output: str
    num_trials: int = 0
    complete: int = 0
    stopped: int = 0
    errored: int = 0
    best_trial: str | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_yaml: str | None = None
    parent_run_id: str | None = None
    parent_run_url: str | None = None
    resumed: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    objective: str = "miou"

    def line(self) -> str:
        s = (f"{self.complete} trials complete, {self.stopped} stopped early, {self.errored} failed "
             f"(budget {self.num_trials}) in {self.seconds:.0f}s")
        if self.best_value is not None:
            s += f"; best {self.objective} {self.best_value:.4f} ({self.best_trial}) -> {self.best_yaml}"
        return s


class CacheLocks:
    """One trial per prompt setting computes its CAMs; the others wait for the file."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}

    async def claim(self, key: str) -> bool:
        if key in self.events:
            return False
        self.events[key] = asyncio.Event()
        return True

    async def wait(self, key: str, timeout: float) -> bool:
        """True once the claimant is done; False after ``timeout`` s (a claimant that died never releases)."""
        try:
            await asyncio.wait_for(self.events[key].wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def release(self, key: str) -> None:
        self.events[key].set()


def sweep_settings(cfg: SweepConfig) -> dict[str, Any]:
    """What makes two runs the same sweep (a resume must not mix two different ones); storage
    options are where, not what."""
    return cfg.model_dump(mode="json", exclude={"overwrite": True, "ray_address": True, "tracking": {"run_name"},
                                                "label": {"dataset": {"storage"}}})


def best_label_data(cfg: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The labeling config as the user wrote it, with the best params; credentials left out."""
    data = cfg.label.model_dump(mode="json", exclude_unset=True)
    st = data.get("dataset", {}).get("storage", {})
    for k in ("key", "secret"):
        st.pop(k, None)
    out = apply_params(data, params)
    build_config(LabelConfig, out, source="best config")  # what `wsss label` will do with it
    return out


def trial_gpus(cfg: SweepConfig) -> float:
    g = cfg.tune.gpus_per_trial
    total = cluster_gpus()
    if g == "auto":
        return 0.0 if total == 0 else min(1.0, total / cfg.tune.max_concurrent_trials)
    if g > 0 and total == 0:
        raise ConfigError(f"tune.gpus_per_trial={g} but the Ray cluster has no GPUs; set it to 0 or auto")
    return float(g)


def choose_subset(ids: list[str], n: int, seed: int) -> list[str]:
    if n >= len(ids):
        return list(ids)
    keep = set(np.random.default_rng(seed).choice(len(ids), size=n, replace=False).tolist())
    return [i for k, i in enumerate(ids) if k in keep]


def write_subset(cfg: SweepConfig, out: str, log) -> cache.Subset:
    ds = open_dataset(cfg.label.dataset)
    if cfg.objective == "miou" and not ds.has_masks():
        raise ConfigError(f"objective: miou needs ground-truth masks, and {ds.uri} (split {cfg.label.dataset.split}) "
                          "has none; use objective=sharpness, or a split with SegmentationClass masks")
    ids, images, labels, masks = [], [], [], []
    for image_id in choose_subset(ds.ids, cfg.subset.num_images, cfg.subset.seed):
        try:
            row = ds.load(image_id)
        except (DatasetError, storage.StorageError, OSError) as e:
            log(f"[wsss sweep] left out of the subset: {e}")
            continue
        if cfg.objective == "miou" and row.mask is None:
            log(f"[wsss sweep] left out of the subset: {image_id} has no ground-truth mask")
            continue
        ids.append(image_id)
        images.append(torch.from_numpy(row.image))
        labels.append(sorted(int(c) for c in row.labels))
        masks.append(None if row.mask is None else torch.from_numpy(row.mask))
    if not ids:
        raise DatasetError(f"no usable image in the subset of {ds.uri} (split {cfg.label.dataset.split})")
    subset = cache.Subset(ids, images, labels, masks, list(ds.classes.names))
    cache.save_subset(subset, cache.subset_uri(out), cfg.label.dataset.storage)
    return subset


def features_task(label: dict[str, Any], output: str, opts: dict[str, Any], layers: list[int], gpus: float) -> float:
    """Runs on the cluster with a trial's resources: the backbone over the subset, once."""
    cfg = LabelConfig.model_validate(label)
    options = storage.StorageOptions.model_validate(opts)
    subset = cache.load_subset(cache.subset_uri(output), options)
    es = cache.clip_es(cfg, subset.class_names, device_for(gpus))
    feats = cache.compute_features(es, subset, layers, cfg.compute.batch_size)
    cache.save_features(feats, cache.features_uri(output), options)
    return feats.seconds


def _mlflow_parent(cfg: SweepConfig, out: str, state: dict[str, Any], n_images: int, n_trials: int) -> tuple[Any, str]:
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
    data = f"{os.path.basename(cfg.label.dataset.uri.rstrip('/'))}/{cfg.label.dataset.split}"
    name = cfg.tracking.run_name or f"sweep {data} {cfg.objective} ({n_trials} trials)"
    desc = (f"Ray Tune + Optuna over {', '.join(cfg.search_space)} on {n_images} images of "
            f"{cfg.label.dataset.uri}; best labeling config in {out}/best.yaml.")
    run = client.create_run(exp_id, run_name=name, tags={
        "wsss.job": "sweep", "wsss.output": out, "wsss.dataset": cfg.label.dataset.uri, "wsss.split": cfg.label.dataset.split,
        "wsss.model": f"{cfg.label.model.name} ({cfg.label.model.pretrained})", "wsss.cam_source": cfg.label.cam_source,
        "wsss.refiner": cfg.label.refine, "wsss.code_version": code_version()["git_commit"][:12],
        "mlflow.note.content": desc})
    params = {"objective": cfg.objective, "subset.num_images": n_images, "subset.seed": cfg.subset.seed,
              **{f"tune.{k}": v for k, v in cfg.tune.model_dump(mode="json").items()},
              "search_space": json.dumps(cfg.search_space)[:6000], "model.name": cfg.label.model.name,
              "dataset.uri": cfg.label.dataset.uri, "dataset.split": cfg.label.dataset.split}
    for k, v in params.items():
        client.log_param(run.info.run_id, k, "" if v is None else str(v))
    return client, run.info.run_id


def _trial_rows(results, dims: list[Dim], n_images: int) -> list[dict[str, Any]]:
    names = [d.name for d in dims]
    rows = []
    for r in results:
        m = r.metrics or {}
        status = "error" if r.error else ("complete" if m.get("complete") == 1 else ("stopped" if m else "pending"))
        row = {"trial": str(m.get("trial_id") or os.path.basename(str(r.path))), "status": status,
               "objective": m.get("objective"), "miou": m.get("miou"), "miou_raw": m.get("miou_raw"),
               "miou_confident": m.get("miou_confident"), "sharpness": m.get("sharpness"),
               "ignore_fraction": m.get("ignore_fraction"), "images": m.get("images"), "of_images": n_images,
               "cams_cached": m.get("cams_cached"), "seconds": m.get("seconds"),
               "error": str(r.error).splitlines()[0][:500] if r.error else None}
        row |= {f"param:{k}": (r.config or {}).get(k) for k in names}
        rows.append(row)
    return rows


def _write_csv(rows: list[dict[str, Any]], uri: str, opts) -> bytes:
    table = pa.Table.from_pylist([{k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in r.items()}
                                  for r in rows])
    sink = pa.BufferOutputStream()
    pyarrow.csv.write_csv(table, sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(uri, data, opts)
    return data


def _finish_parent(client, run_id: str, summary: SweepSummary, rows: list[dict[str, Any]], dims: list[Dim],
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


def _claim(cfg: SweepConfig, out: str, log) -> dict[str, Any]:
    """The sweep's state in the (locked) output: refuse a different sweep there; start over on overwrite."""
    opts = cfg.label.dataset.storage
    if cfg.overwrite:
        for name in RESULT_FILES:
            storage.remove(storage.join(out, name), opts)
    state_uri = storage.join(out, "sweep.json")
    state = json.loads(storage.read_text(state_uri, opts)) if storage.exists(state_uri, opts) else {}
    settings = sweep_settings(cfg)
    if state and state.get("fingerprint") != fingerprint(settings):
        refuse_changed(out, state.get("settings") or state.get("config", {}), settings, "a sweep")
    # Claim the output before caching anything in it, so a later, different sweep cannot pick up these caches.
    state = {"fingerprint": fingerprint(settings), "settings": settings, "code": code_version()} | {
        k: v for k, v in state.items() if k in ("parent_run_id", "subset", "finished")}
    storage.write_text(state_uri, json.dumps(state, indent=2), opts)
    return state


def run_sweep(cfg: SweepConfig, dims: list[Dim], log=print) -> SweepSummary:
    """Run (or resume) the sweep to the end of its budget; returns the summary. A finished sweep
    is not run again: its summary is reported as it was."""
    check_credentials_reach_workers(cfg.ray_address, cfg.label.dataset.storage)
    storage.export_credentials(cfg.label.dataset.storage)
    check_model_paths(cfg.label)
    out = cfg.output.rstrip("/")
    with OutputLock(out, cfg.label.dataset.storage, "wsss sweep"):
        state = _claim(cfg, out, log)
        if state.get("finished"):
            summary = SweepSummary(**state["finished"])
            log(f"[wsss sweep] {out} holds this sweep, finished: nothing to do (overwrite=true starts it over)")
            log(f"[wsss sweep] {summary.line()}")
            return summary
        return _run_sweep(cfg, dims, out, state, log)


def _tuner(cfg: SweepConfig, dims: list[Dim], trainable, out: str, parent: str | None, num_samples: int,
           summary: SweepSummary, log):
    """A new Tuner, or the interrupted one restored from ``<output>/tune``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from wsss_platform import tracking
    from wsss_platform.console import verbose
    from wsss_platform.sweep.report import TrialLines, TrialRuns

    pa_fs, tune_root = storage.pyarrow_filesystem(storage.join(out, "tune"), cfg.label.dataset.storage)
    exp_path = tune_root.rstrip("/") + "/" + EXPERIMENT
    if tune.Tuner.can_restore(exp_path, storage_filesystem=pa_fs):
        summary.resumed = True
        log(f"[wsss sweep] resuming the interrupted sweep in {exp_path}")
        return tune.Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=pa_fs)
    callbacks: list = [TrialLines(num_samples, cfg.objective, cfg.mode)]
    if parent:
        callbacks.append(TrialRuns(
            tracking_uri=tracking.tracking_uri(), experiment_name=cfg.tracking.experiment,
            tags={"mlflow.parentRunId": parent, "wsss.job": "sweep-trial", "wsss.output": out}))
    scheduler = ASHAScheduler(metric="objective", mode=cfg.mode, max_t=cfg.tune.report_chunks,
                              grace_period=1, reduction_factor=2) if cfg.tune.early_stopping else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher(cfg, dims), scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=cfg.tune.max_concurrent_trials, time_budget_s=cfg.tune.time_budget_s,
            reuse_actors=True,  # a trial's actor (and its loaded caches) serves the next trial
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        # Tune's tables and hints only with --verbose; TrialLines prints one line per trial.
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=tune_root, storage_filesystem=pa_fs,
                                  callbacks=callbacks, verbose=1 if verbose() else 0))


def _best(cfg: SweepConfig, rows: list[dict[str, Any]], out: str,
          summary: SweepSummary) -> tuple[dict[str, Any], str] | None:
    """The best scored trial's row and the ``best.yaml`` text written for it; None when none scored."""
    scored = [r for r in rows if r["status"] == "complete" and r["objective"] is not None and not math.isnan(r["objective"])]
    if not scored:
        return None
    # Ties (common: mask.mu does not move miou) go to the earliest trial, so a rerun picks the same one.
    scored.sort(key=lambda r: r["trial"])
    best = (max if cfg.mode == "max" else min)(scored, key=lambda r: r["objective"])
    summary.best_trial, summary.best_value = best["trial"], float(best["objective"])
    summary.best_yaml = storage.join(out, "best.yaml")
    summary.best_params = resolve_params(
        {k[6:]: v for k, v in best.items() if k.startswith("param:") and v is not None}, cfg.label.mask.bg_rule)
    header = (f"# Best trial {best['trial']} of the sweep in {out}: {cfg.objective} = {best['objective']:.4f} on "
              f"{best['images']} images of {cfg.label.dataset.uri}.\n"
              f"# Run it (from the folder the sweep ran in): wsss label --config {summary.best_yaml}\n")
    text = header + yaml.safe_dump(best_label_data(cfg, summary.best_params), sort_keys=False)
    storage.write_text(summary.best_yaml, text, cfg.label.dataset.storage)
    return best, text


def _cache_features(cfg: SweepConfig, dims: list[Dim], out: str, label_payload: dict[str, Any], gpus: float,
                    log) -> None:
    """The subset's backbone features, once per sweep, by a Ray task with a trial's resources."""
    import ray

    layers = cache.attn_layers_needed(cfg.label, dims)
    log(f"[wsss sweep] backbone features of the subset (once; attention for L in {layers}) ...")
    task = ray.remote(features_task).options(num_cpus=cfg.tune.cpus_per_trial, num_gpus=gpus)
    secs = ray.get(task.remote(label_payload, out, label_payload["dataset"]["storage"], layers, gpus))
    log(f"[wsss sweep] features cached in {secs:.1f}s")


def _open_parent(cfg: SweepConfig, dims: list[Dim], out: str, state: dict[str, Any], n_images: int,
                 summary: SweepSummary, log) -> tuple[Any, str]:
    from wsss_platform import tracking

    trials = min(cfg.tune.num_trials, space_size(dims) or cfg.tune.num_trials)
    client, parent = _mlflow_parent(cfg, out, state, n_images, trials)
    summary.parent_run_id = parent
    summary.parent_run_url = tracking.run_url(client.get_run(parent).info.experiment_id, parent)
    log(f"[wsss sweep] MLflow run: {summary.parent_run_url}")
    return client, parent


def _tally(cfg: SweepConfig, rows: list[dict[str, Any]], summary: SweepSummary, t_start: float) -> int:
    """Trial counts into the summary; returns how many trials finished (one way or another)."""
    summary.complete = sum(r["status"] == "complete" for r in rows)
    summary.stopped = sum(r["status"] == "stopped" for r in rows)
    summary.errored = sum(r["status"] == "error" for r in rows)
    finished = summary.complete + summary.stopped + summary.errored
    summary.seconds = time.perf_counter() - t_start
    budget_hit = cfg.tune.time_budget_s is not None and summary.seconds >= cfg.tune.time_budget_s
    summary.interrupted = finished < summary.num_trials and not budget_hit
    return finished


def _run_sweep(cfg: SweepConfig, dims: list[Dim], out: str, state: dict[str, Any], log) -> SweepSummary:
    from ray import tune

    from wsss_platform.sweep import trial

    t_start = time.perf_counter()
    opts = cfg.label.dataset.storage
    state_uri = storage.join(out, "sweep.json")
    summary = SweepSummary(output=out, num_trials=cfg.tune.num_trials, objective=cfg.objective)

    subset_uri = cache.subset_uri(out)
    subset = cache.load_subset(subset_uri, opts) if storage.exists(subset_uri, opts) else write_subset(cfg, out, log)
    log(f"[wsss sweep] {cfg.label.dataset.uri} ({cfg.label.dataset.layout}, split {cfg.label.dataset.split}): "
        f"{len(subset.ids)} images in the subset; objective {cfg.objective} ({cfg.mode}); "
        f"{cfg.tune.num_trials} trials over {', '.join(d.name for d in dims)} -> {out}")

    init_ray(cfg.ray_address, opts)
    quiet_ray()
    keep_credentials_out_of_runtime_envs()
    import ray

    gpus = trial_gpus(cfg)
    # No credentials in anything Tune pickles (the trainable's parameters, the experiment state).
    label_payload = cfg.label.model_dump(mode="json") | {"dataset": _dataset_payload(cfg.label)}
    storage_payload = label_payload["dataset"]["storage"]
    if not storage.exists(cache.features_uri(out), opts):
        _cache_features(cfg, dims, out, label_payload, gpus, log)
    client, parent = _open_parent(cfg, dims, out, state, len(subset.ids), summary, log) if cfg.tracking.enabled else (None, None)
    state |= {"parent_run_id": parent, "subset": subset.ids, "updated_at": time.time()}
    storage.write_text(state_uri, json.dumps(state, indent=2), opts)

    locks_name = f"wsss-sweep-locks-{uuid.uuid4().hex[:8]}"
    locks = ray.remote(CacheLocks).options(name=locks_name, num_cpus=0).remote()  # noqa: F841 (kept alive by the driver)
    ctx = TrialContext(out, label_payload, storage_payload, cfg.objective, cfg.tune.report_chunks, gpus, locks_name)
    trainable = tune.with_resources(tune.with_parameters(trial.trainable, ctx=ctx),
                                    {"cpu": cfg.tune.cpus_per_trial, "gpu": gpus})
    num_samples = cfg.tune.num_trials
    if (size := space_size(dims)) is not None and size < num_samples:
        log(f"[wsss sweep] the search space holds only {size} settings: {size} trials, each once (budget {num_samples})")
        num_samples = summary.num_trials = size
    try:
        tuner = _tuner(cfg, dims, trainable, out, parent, num_samples, summary, log)
        results = tuner.fit()
    except BaseException:
        if parent:
            client.set_terminated(parent, status="KILLED")
        raise

    rows = _trial_rows(results, dims, len(subset.ids))
    finished = _tally(cfg, rows, summary, t_start)
    files = {"trials.csv": _write_csv(rows, storage.join(out, "trials.csv"), opts)} if rows else {}
    if found := _best(cfg, rows, out, summary):
        best, files["best.yaml"] = found[0], found[1].encode()
        params = {k[6:]: v for k, v in best.items() if k.startswith("param:") and v is not None}
        if parent and (png := trial.preview(params, ctx, cfg.label.tracking.preview_images)):
            files["preview_best.png"] = png
    if not summary.interrupted:
        state["finished"] = dataclasses.asdict(summary)
        storage.write_text(state_uri, json.dumps(state, indent=2), opts)
    files["sweep.json"] = json.dumps(state, indent=2).encode()
    if parent:
        _finish_parent(client, parent, summary, rows, dims, cfg.mode, files, log)
        client.set_terminated(parent, status="KILLED" if summary.interrupted else "FINISHED")
    if summary.interrupted:
        log(f"[wsss sweep] interrupted after {finished} of {summary.num_trials} trials; run the same command "
            "again to resume")
    log(f"[wsss sweep] {summary.line()}")
    return summary

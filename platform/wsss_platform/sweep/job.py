"""``wsss sweep``: Ray Tune + Optuna over a job's settings (driver side).

claim the output (``state``) -> the objective prepares what trials share (labeling: the subset and
the CAM source's caches, ``objective``) -> MLflow parent run (``parent``) -> Tune runs trials
(OptunaSearch with seeded TPE, ASHA on the chunked objective) -> trials table, best config to
``<output>/best.yaml`` (``results``), Optuna's plots. One child run per trial.

An interrupted sweep (Ctrl-C, ``wsss jobs stop``, a lost driver) resumes when the same command runs
again: Tune restores the experiment from ``<output>/tune`` and finishes the budget without
rerunning finished trials.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from wsss_platform import storage
from wsss_platform.config import ConfigError
from wsss_platform.console import quiet_ray
from wsss_platform.ownership import OutputLock
from wsss_platform.ray_utils import (
    check_credentials_reach_workers,
    cluster_gpus,
    init_ray,
    keep_credentials_out_of_runtime_envs,
)
from wsss_platform.sweep.config import Dim, SweepConfig
from wsss_platform.sweep.objective import Objective, objective_class
from wsss_platform.sweep.parent import finish_parent, open_parent
from wsss_platform.sweep.results import tally, trial_rows, write_best, write_csv
from wsss_platform.sweep.search import searcher, space_size
from wsss_platform.sweep.state import SweepSummary, claim, save_state

EXPERIMENT = "sweep"


def trial_gpus(cfg: SweepConfig) -> float:
    g = cfg.tune.gpus_per_trial
    total = cluster_gpus()
    if g == "auto":
        return 0.0 if total == 0 else min(1.0, total / cfg.tune.max_concurrent_trials)
    if g > 0 and total == 0:
        raise ConfigError(f"tune.gpus_per_trial={g} but the Ray cluster has no GPUs; set it to 0 or auto")
    return float(g)


def run_sweep(cfg: SweepConfig, dims: list[Dim], log=print) -> SweepSummary:
    """Run (or resume) the sweep to the end of its budget; returns the summary. A finished sweep
    is not run again: its summary is reported as it was."""
    check_credentials_reach_workers(cfg.ray_address, cfg.storage)
    storage.export_credentials(cfg.storage)
    objective_class(cfg).check(cfg)
    out = cfg.output.rstrip("/")
    with OutputLock(out, cfg.storage, "wsss sweep"):
        state = claim(cfg, out, log)
        if state.get("finished"):
            summary = SweepSummary(**state["finished"])
            log(f"[wsss sweep] {out} holds this sweep, finished: nothing to do (overwrite=true starts it over)")
            log(f"[wsss sweep] {summary.line()}")
            return summary
        return _run_sweep(cfg, dims, out, state, log)


def _tuner(cfg: SweepConfig, dims: list[Dim], trainable, out: str, parent: str | None, num_samples: int,
           summary: SweepSummary, log, reuse_actors: bool = True):
    """A new Tuner, or the interrupted one restored from ``<output>/tune``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from wsss_platform import tracking
    from wsss_platform.console import verbose
    from wsss_platform.sweep.report import TrialLines, TrialRuns

    pa_fs, tune_root = storage.pyarrow_filesystem(storage.join(out, "tune"), cfg.storage)
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
            reuse_actors=reuse_actors,  # labeling: a trial's actor (and its loaded caches) serves the next trial
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        # Tune's tables and hints only with --verbose; TrialLines prints one line per trial.
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=tune_root, storage_filesystem=pa_fs,
                                  callbacks=callbacks, verbose=1 if verbose() else 0))


def _budget(dims: list[Dim], summary: SweepSummary, log) -> int:
    """Trials to run: the budget, or the size of a small enumerable space (each setting once)."""
    if (size := space_size(dims)) is not None and size < summary.num_trials:
        log(f"[wsss sweep] the search space holds only {size} settings: {size} trials, each once "
            f"(budget {summary.num_trials})")
        summary.num_trials = size
    return summary.num_trials


def _fit(cfg: SweepConfig, dims: list[Dim], objective: Objective, out: str, parent, gpus: float,
         summary: SweepSummary, log):
    """Tune's results for every trial (resuming an interrupted run); the parent run is KILLED on failure."""
    from ray import tune

    trainable = tune.with_resources(objective.trainable(), objective.resources())
    try:
        return _tuner(cfg, dims, trainable, out, parent and parent[1], _budget(dims, summary, log), summary, log,
                      objective.reuse_actors).fit()
    except BaseException:
        if parent:
            parent[0].set_terminated(parent[1], status="KILLED")
        raise


def _run_sweep(cfg: SweepConfig, dims: list[Dim], out: str, state: dict[str, Any], log) -> SweepSummary:
    t_start = time.perf_counter()
    opts = cfg.storage
    summary = SweepSummary(output=out, num_trials=cfg.tune.num_trials, objective=cfg.objective)
    kind = objective_class(cfg)
    init_ray(cfg.ray_address, opts, **kind.ray_options)
    quiet_ray()
    keep_credentials_out_of_runtime_envs()
    gpus = trial_gpus(cfg)
    objective = kind(cfg, out, gpus)
    ids = objective.prepare(dims, log)
    parent = open_parent(cfg, dims, out, state, len(ids), summary, log) if cfg.tracking.enabled else None
    state |= {"parent_run_id": parent and parent[1], "subset": ids, "updated_at": time.time()}
    save_state(out, state, opts)
    rows = trial_rows(_fit(cfg, dims, objective, out, parent, gpus, summary, log), dims, len(ids))
    finished = tally(cfg, rows, summary, t_start)
    files = {"trials.csv": write_csv(rows, storage.join(out, "trials.csv"), opts)} if rows else {}
    if found := write_best(cfg, rows, out, summary):
        files["best.yaml"] = found[1].encode()
        if parent and (png := objective.preview(summary.best_params)):
            files["preview_best.png"] = png
    if not summary.interrupted:
        state["finished"] = dataclasses.asdict(summary)
        save_state(out, state, opts)
    files["sweep.json"] = json.dumps(state, indent=2).encode()
    if parent:
        finish_parent(parent[0], parent[1], summary, rows, dims, cfg.mode, files, log)
        parent[0].set_terminated(parent[1], status="KILLED" if summary.interrupted else "FINISHED")
    if summary.interrupted:
        log(f"[wsss sweep] interrupted after {finished} of {summary.num_trials} trials; run the same command "
            "again to resume")
    log(f"[wsss sweep] {summary.line()}")
    return summary

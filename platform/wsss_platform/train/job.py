"""``wsss train <recipe>`` on Ray Train (driver side), for every recipe (``recipes``).

ids of the split -> Ray Data samples (``recipe.dataset``) -> ``TorchTrainer`` (``loop``, DDP over
``compute.num_workers``) with checkpoints in ``<output>/train/`` (local or s3://), the best kept by
the recipe's val score, and ``FailureConfig(max_failures)``: a lost worker restarts the group from the last
checkpoint. Running the same command again continues an interrupted run (Train V2 restores its
checkpoints from the same storage path and name) in the same MLflow run. The final model is logged
with ``mlflow.pytorch.log_model`` (and registered when ``tracking.register_as`` is set).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from wsss_platform import outputs, storage
from wsss_platform.config import ConfigError, flatten
from wsss_platform.console import quiet_ray, verbose
from wsss_platform.datasets import Dataset, keep_index, open_indexed
from wsss_platform.ownership import OutputLock, fingerprint, refuse_changed
from wsss_platform.ray_utils import (
    check_credentials_reach_workers,
    cluster_gpus,
    code_version,
    init_ray,
)
from wsss_platform.tracking import JobRun, tracking_uri
from wsss_platform.train import loop
from wsss_platform.train.config import TrainBase
from wsss_platform.train.recipes import Recipe, recipe_for

NAME = "train"


@dataclass
class TrainSummary:
    output: str
    iterations: int = 0
    val_miou: float | None = None
    """The recipe's val score (``score``): the segmenter's mIoU, ToCo's CAM mIoU."""
    score: str = "val_miou"
    checkpoint: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        s = f"trained {self.iterations} iterations in {self.seconds:.0f}s"
        if self.val_miou is not None:
            s += f"; {self.score} {self.val_miou:.4f}"
        return s + f"; checkpoint {self.checkpoint}"


def _val(cfg: TrainBase, folder: str) -> tuple[Dataset | None, str | None]:
    """The val split and its index's URI (what each worker reads its slice of), when it has ground truth."""
    if not cfg.train.val_split:
        return None, None
    val_cfg = cfg.dataset.model_copy(update={"split": cfg.train.val_split})
    ds, uri = open_indexed(val_cfg, folder)
    if not ds.has_masks():
        raise ConfigError(f"train.val_split: {ds.uri} split {cfg.train.val_split} has no ground-truth masks; "
                          f"choose a split with masks in {cfg.dataset.masks_dir}/, set dataset.masks_dir, or "
                          "val_split: null")
    return ds, uri


RESUMABLE_KEYS = ("iterations", "checkpoint_every", "eval_every", "eval_scales", "eval_flip", "feature_cache")
"""train.* keys a continued training may change (a longer schedule, other evaluation)."""


def train_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What makes a training the same one: the data, labels, model and schedule, not where or how it runs."""
    data = {k: config["dataset"].get(k) for k in ("uri", "layout", "split", "masks_dir", "labels_from", "limit")}
    schedule = {k: v for k, v in config["train"].items() if k not in RESUMABLE_KEYS}
    return {"dataset": data, "model": config["model"], "train": schedule}


def read_state(cfg: TrainBase) -> dict[str, Any]:
    """The output's ``train.json`` ({} when there is none), with ``latest``: the iteration of its last
    registered checkpoint (Train's checkpoint manager snapshot), 0 when it has none."""
    uri, opts = storage.join(cfg.output, "train.json"), cfg.dataset.storage
    if not storage.exists(uri, opts):
        return {}
    state = json.loads(storage.read_text(uri, opts))
    snapshot = storage.join(cfg.output, NAME, "checkpoint_manager_snapshot.json")
    latest = (json.loads(storage.read_text(snapshot, opts)).get("latest_checkpoint_result") or {}
              if storage.exists(snapshot, opts) else {})
    return state | {"latest": int((latest.get("metrics") or {}).get("iteration", 0))}


def finished(cfg: TrainBase, state: dict[str, Any]) -> bool:
    """The output holds this training, finished at (or past) the requested iterations: nothing to do."""
    done = state.get("finished") or {}
    return (not cfg.overwrite and done.get("iterations", 0) >= cfg.train.iterations
            and fingerprint(train_settings(state["config"])) == fingerprint(train_settings(cfg.model_dump(mode="json"))))


def claim(cfg: TrainBase, log) -> dict[str, Any]:
    """The output's training state: {} for a new one (or after overwrite, or when an earlier run ended
    before its first checkpoint: nothing of it is worth keeping); refuses one trained with other
    settings, which a continued run would silently mix into its checkpoints."""
    opts = cfg.dataset.storage
    state = {} if cfg.overwrite else read_state(cfg)
    if not state.get("latest"):
        for name in (NAME, "train.json"):
            storage.remove(storage.join(cfg.output, name), opts)
        return {}
    old, new = train_settings(state["config"]), train_settings(cfg.model_dump(mode="json"))
    if fingerprint(old) != fingerprint(new):
        refuse_changed(cfg.output, old, new, "a training")
    log(f"[wsss train] {cfg.output} holds this training: continuing from its checkpoint at iteration {state['latest']}"
        f" to {cfg.train.iterations}")
    return state


def _trainer(recipe: Recipe, loop_config: dict[str, Any], train_ds, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    # imports ray: after init_ray's environment
    from wsss_platform.train.failures import StopOnPermanentError

    cfg = recipe.cfg
    use_gpu = uses_gpu(cfg)
    pa_fs, root = storage.pyarrow_filesystem(cfg.output, cfg.dataset.storage)
    has_val = bool(loop_config["val_ids"])
    return TorchTrainer(
        loop.train_loop_per_worker, train_loop_config=loop_config, datasets={"train": train_ds},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.compute.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.compute.cpus_per_worker},
                                               placement_strategy=cfg.compute.placement_strategy),
        run_config=ray.train.RunConfig(
            name=NAME, storage_path=root, storage_filesystem=pa_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.compute.checkpoints_to_keep, checkpoint_score_attribute=recipe.score if has_val else None,
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.compute.max_failures),
            callbacks=[StopOnPermanentError(), *(callbacks or [])],
            # Train's own per-report and setup lines only with --verbose; rank 0 prints the progress lines
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")))


def uses_gpu(cfg: TrainBase) -> bool:
    return cluster_gpus() > 0 if cfg.compute.use_gpu == "auto" else bool(cfg.compute.use_gpu)


def check_cpus(cfg: TrainBase, concurrent: int = 1, overhead: float = 0.0) -> None:
    """The workers and the data loader must fit at once, or Ray Data waits for CPUs forever."""
    import ray

    c = cfg.compute
    need = concurrent * (c.num_workers * c.cpus_per_worker + c.loader_cpus + overhead)
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        times = f"{concurrent} concurrent trainings × (" if concurrent > 1 else ""
        raise ConfigError(f"compute: {times}{c.num_workers} workers × cpus_per_worker {c.cpus_per_worker} + loader_cpus "
                          f"{c.loader_cpus}{')' if times else ''} = {need:g} CPUs, the cluster has {have:g}; lower "
                          "compute.cpus_per_worker or compute.num_workers" + (" or tune.max_concurrent_trials" if times else ""))


def _log_model(cfg: TrainBase, model: torch.nn.Module, run: JobRun) -> None:
    """The trained network as an MLflow model (registered under ``tracking.register_as``)."""
    import mlflow.pytorch

    # pickle: the pt2 format would trace the model on an input example of one fixed size; MLflow warns
    # at every pickled model that pickle can run code when loaded, which the choice already weighed
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.pytorch.log_model(model, name="model", run_id=run.run_id, serialization_format="pickle",
                             registered_model_name=cfg.tracking.register_as)


def per_class_table(metrics: dict[str, float], names: list[str]) -> dict[str, list]:
    """``<metric>/<class>`` IoUs of the final metrics as columns, one row per class."""
    prefixes = sorted({k.split("/", 1)[0] for k in metrics if "_iou/" in k})
    return {"class": list(names)} | {p: [None if (v := metrics.get(f"{p}/{n}")) is None else round(v, 4) for n in names]
                                     for p in prefixes}


def _track(recipe: Recipe, ds, summary: TrainSummary, run: JobRun) -> None:
    """The final checkpoint's URI as a tag, the model, the per-class val IoU and a preview grid."""
    cfg = recipe.cfg
    run.client.set_tag(run.run_id, "wsss.checkpoint", summary.checkpoint)
    model, names = recipe.load(summary.checkpoint, cfg.dataset.storage)
    _log_model(cfg, model, run)
    if summary.val_miou is not None:
        run.log_table(per_class_table(summary.metrics, names), "per_class_val_iou.json")
    if cfg.tracking.preview_images:
        run.log_bytes(recipe.preview(model, ds), "preview.png")


def _keep_registered_checkpoints(cfg: TrainBase, result) -> str | None:
    """The last checkpoint's URI, after removing checkpoint folders Train never registered.

    A worker killed after rank 0 wrote a checkpoint but before Train's controller took the report
    leaves that folder behind: the group resumed from the one before, and Train's checkpoint manager
    (which prunes to ``num_to_keep``) does not know it, so it would stay forever and could be
    mistaken for the run's latest."""
    if result.checkpoint is None:
        return None
    root = storage.join(cfg.output, "train")
    kept = {os.path.basename(c.path.rstrip("/")) for c, _ in result.best_checkpoints}
    kept.add(os.path.basename(result.checkpoint.path.rstrip("/")))
    for name in storage.list_names(root, cfg.dataset.storage):
        if name.startswith("checkpoint_") and name not in kept and name != "checkpoint_manager_snapshot.json":
            storage.remove(storage.join(root, name), cfg.dataset.storage)
    return storage.join(root, os.path.basename(result.checkpoint.path.rstrip("/")))


def absolute_paths(recipe: Recipe) -> TrainBase:
    """Local paths made absolute on the driver: Train's workers run in a folder of their own."""
    from wsss_core.models.weights import looks_like_path

    def path(value: str) -> str:
        return storage.absolute(value) if looks_like_path(value) else value

    cfg = recipe.cfg
    backbone = cfg.model.backbone
    if backbone.startswith("open_clip:"):
        backbone = "open_clip:" + path(backbone.removeprefix("open_clip:"))
    return cfg.model_copy(update={
        "output": storage.absolute(cfg.output.rstrip("/")),
        "dataset": cfg.dataset.model_copy(update={"uri": storage.absolute(cfg.dataset.uri)}),
        "model": cfg.model.model_copy(update={"backbone": backbone, "pretrained": path(cfg.model.pretrained)}),
        "train": cfg.train.model_copy(update=recipe.absolute_train())})


@dataclass
class Plan:
    """What a training needs before Ray Train starts, checked on the driver."""

    recipe: Recipe
    ds: Any
    loop_config: dict[str, Any]
    payload: dict[str, Any]
    indexes: list[tuple[Any, str]]
    """(split, URI) of the train and val splits' indexes: written by ``keep_indexes`` once the run goes ahead."""

    @property
    def cfg(self) -> TrainBase:
        return self.recipe.cfg

    def keep_indexes(self) -> None:
        for split, uri in self.indexes:
            keep_index(split, uri, self.cfg.dataset.storage)

    def trainer(self, callbacks: list | None = None):
        return _trainer(self.recipe, self.loop_config, self.recipe.dataset(self.ds, self.ds.ids), callbacks)


def plan(cfg: TrainBase, index_folder: str | None = None) -> Plan:
    """Paths made absolute, the split opened, the labels and the val split checked (no Ray needed).
    The splits' indexes are read from (or go to) ``index_folder``, by default ``<output>/index``
    (a sweep's trials share the sweep's)."""
    recipe = recipe_for(absolute_paths(recipe_for(cfg)))
    cfg = recipe.cfg
    folder = index_folder or storage.join(cfg.output, outputs.INDEX)
    ds, index = open_indexed(cfg.dataset, folder)
    val, val_index = _val(cfg, folder)
    val_ids = list(val.ids) if val is not None else []
    recipe.check(ds, val_ids)
    payload = cfg.dataset.worker_payload()
    names = ["background", *ds.classes.names]
    loop_config = {"recipe": type(cfg).recipe, "cfg": cfg.model_dump(mode="json") | {"dataset": payload},
                   "class_names": names, "val_index": val_index, "val_ids": val_ids,
                   "verbose": verbose()}
    return Plan(recipe, ds, loop_config, payload, [(ds, index)] + ([(val, val_index)] if val is not None else []))


def run_train(cfg: TrainBase, log=print) -> TrainSummary:
    t0 = time.perf_counter()
    check_credentials_reach_workers(cfg.ray_address, cfg.dataset.storage)
    storage.export_credentials(cfg.dataset.storage)
    p = plan(cfg)
    summary = TrainSummary(output=p.cfg.output, score=p.recipe.score)
    if finished(p.cfg, state := read_state(p.cfg)):
        return _nothing_to_do(p, state, summary, log)
    # Train V2's placement-group cleaner asks the State API (served by the dashboard) whether the
    # controller lives; without a dashboard it warns every few seconds for the whole run.
    init_ray(cfg.ray_address, cfg.dataset.storage, include_dashboard=True)
    quiet_ray()
    check_cpus(p.cfg)
    with OutputLock(p.cfg.output, cfg.dataset.storage, "wsss train"):
        state = claim(p.cfg, log)
        p.keep_indexes()  # a refused run (other settings, a busy output) wrote nothing
        _fit(p, state, summary, log)
    summary.seconds = time.perf_counter() - t0
    log(f"[wsss train] {summary.line()}")
    return summary


def _nothing_to_do(p: Plan, state: dict[str, Any], summary: TrainSummary, log) -> TrainSummary:
    """A rerun of a finished training: its output and MLflow run are left as they are."""
    done = state["finished"]
    summary.iterations, summary.checkpoint, summary.val_miou = done["iterations"], done["checkpoint"], done.get("score")
    summary.run_id, summary.run_url = state.get("mlflow_run_id"), done.get("run_url")
    score = f", {summary.score} {summary.val_miou:.4f}" if summary.val_miou is not None else ""
    log(f"[wsss train] nothing to do: {p.cfg.output} holds this training, finished at iteration {summary.iterations}"
        f"{score}; checkpoint {summary.checkpoint} (a longer train.iterations continues it; --overwrite starts over)")
    return summary


def fit(trainer):
    """``trainer.fit()`` in a thread of its own. In the main thread Train installs a SIGINT handler
    that aborts the run and then exits the process with 0 or 1 (depending on the moment, and
    silently); without it Ctrl-C is a KeyboardInterrupt here at any moment, as in every other job: the
    MLflow run ends KILLED, the lock is released and the next run continues from the last checkpoint."""
    import threading

    from wsss_platform.train.failures import permanent_cause

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread, which raises it
            box["error"] = e

    thread = threading.Thread(target=target, name="wsss-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        cause = permanent_cause(box["error"])
        raise cause if cause is not None else box["error"]
    return box["result"]


def _fit(p: Plan, state: dict[str, Any], summary: TrainSummary, log) -> None:
    cfg, ds, loop_config = p.cfg, p.ds, p.loop_config
    log(f"[wsss train] {p.recipe.name}: {ds.uri} split {cfg.dataset.split}: {len(ds.ids)} images, {p.recipe.labels()}, "
        f"{cfg.compute.num_workers} worker(s), {cfg.train.iterations} iterations -> {cfg.output}")
    with _job_run(p.recipe, ds, state) as run:
        if run is not None:
            loop_config["mlflow"] = {"tracking_uri": tracking_uri(), "run_id": run.run_id}
            summary.run_id, summary.run_url = run.run_id, run.url
            log(f"[wsss train] MLflow run: {run.url}")
            run.log_split(ds, "training")
        record = {"config": loop_config["cfg"], "mlflow_run_id": summary.run_id, "code": code_version()}
        storage.write_text(storage.join(cfg.output, "train.json"), json.dumps(record, indent=2), cfg.dataset.storage)
        loop_config["progress"] = True  # rank 0's progress lines (a sweep's trials show none)
        p.recipe.prepare(ds, ds.ids, loop_config["class_names"], uses_gpu(cfg), log)
        log(f"[wsss train] starting {cfg.compute.num_workers} worker(s) and the data loader; the first iteration "
            "waits for its first batch")
        result = fit(p.trainer())
        summary.metrics = dict(result.metrics or {})
        summary.iterations = int(summary.metrics.get("iteration", 0))
        summary.val_miou = summary.metrics.get(p.recipe.score)
        summary.checkpoint = _keep_registered_checkpoints(cfg, result)
        if run is not None and summary.checkpoint:
            _track(p.recipe, ds, summary, run)
        record["finished"] = {"iterations": summary.iterations, "checkpoint": summary.checkpoint,
                              "score": summary.val_miou, "run_url": summary.run_url}
        storage.write_text(storage.join(cfg.output, "train.json"), json.dumps(record, indent=2), cfg.dataset.storage)


def short_name(backbone: str) -> str:
    """``open_clip:/abs/path/tinyclip.json`` -> ``open_clip:tinyclip``: a run name, not a path."""
    prefix, sep, name = backbone.rpartition("open_clip:")
    name = os.path.splitext(os.path.basename(name))[0] if "/" in name or name.endswith(".json") else name
    return f"{prefix}{sep}{name}"


def _job_run(recipe: Recipe, ds, state: dict[str, Any]):
    import contextlib

    cfg = recipe.cfg
    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    source = recipe.labels()
    name = cfg.tracking.run_name or (f"train {os.path.basename(ds.uri.rstrip('/'))}/{cfg.dataset.split} {recipe.name} "
                                     f"{short_name(cfg.model.backbone)}")
    tags = {"wsss.job": "train", "wsss.recipe": recipe.name, "wsss.dataset": ds.uri, "wsss.output": cfg.output,
            "wsss.model": f"{cfg.model.backbone} ({cfg.model.pretrained})", "wsss.labels": source,
            "wsss.code_version": code_version()["git_commit"][:12]}
    return JobRun(cfg.tracking.experiment, name, tags, f"{recipe.name} on {source} of {ds.uri}; checkpoints in {cfg.output}.",
                  flatten(cfg.model_dump(mode="json", exclude={"dataset": {"storage"}})),
                  resume_run_id=state.get("mlflow_run_id"))

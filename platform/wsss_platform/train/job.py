"""``wsss train segmenter``: the segmenter on pseudo masks with CGL, on Ray Train (driver side).

ids of the split -> Ray Data crops (``data``) -> ``TorchTrainer`` (``loop``, DDP over
``compute.num_workers``) with checkpoints in ``<output>/train/`` (local or s3://), the best kept by
val mIoU, and ``FailureConfig(max_failures)``: a lost worker restarts the group from the last
checkpoint. Running the same command again continues an interrupted run (Train V2 restores its
checkpoints from the same storage path and name) in the same MLflow run. The final model is logged
with ``mlflow.pytorch.log_model`` (and registered when ``tracking.register_as`` is set).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from wsss_platform import storage
from wsss_platform.config import ConfigError, flatten
from wsss_platform.console import quiet_ray, verbose
from wsss_platform.datasets import open_dataset
from wsss_platform.ray_utils import (
    check_credentials_reach_workers,
    cluster_gpus,
    code_version,
    init_ray,
)
from wsss_platform.tracking import JobRun, tracking_uri
from wsss_platform.train import data, loop
from wsss_platform.train.config import TrainConfig

NAME = "train"


@dataclass
class TrainSummary:
    output: str
    iterations: int = 0
    val_miou: float | None = None
    checkpoint: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        s = f"trained {self.iterations} iterations in {self.seconds:.0f}s"
        if self.val_miou is not None:
            s += f"; val mIoU {self.val_miou:.4f}"
        return s + f"; checkpoint {self.checkpoint}"


def _val(cfg: TrainConfig) -> tuple[dict[str, Any] | None, list[str]]:
    """The val split's dataset payload and ids, when it has ground truth."""
    if not cfg.train.val_split:
        return None, []
    val_cfg = cfg.dataset.model_copy(update={"split": cfg.train.val_split})
    ds = open_dataset(val_cfg)
    if not ds.has_masks():
        raise ConfigError(f"train.val_split: {ds.uri} split {cfg.train.val_split} has no ground-truth masks; "
                          "choose a split with SegmentationClass masks, or val_split: null")
    return val_cfg.worker_payload(), list(ds.ids)


def _state(cfg: TrainConfig) -> dict[str, Any]:
    uri = storage.join(cfg.output, "train.json")
    return json.loads(storage.read_text(uri, cfg.dataset.storage)) if storage.exists(uri, cfg.dataset.storage) else {}


def _trainer(cfg: TrainConfig, loop_config: dict[str, Any], train_ds):
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = cluster_gpus() > 0 if cfg.compute.use_gpu == "auto" else bool(cfg.compute.use_gpu)
    pa_fs, root = storage.pyarrow_filesystem(cfg.output, cfg.dataset.storage)
    has_val = bool(loop_config["val_ids"])
    return TorchTrainer(
        loop.train_loop_per_worker, train_loop_config=loop_config, datasets={"train": train_ds},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.compute.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.compute.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=NAME, storage_path=root, storage_filesystem=pa_fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.compute.checkpoints_to_keep, checkpoint_score_attribute="val_miou" if has_val else None,
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.compute.max_failures),
            # Train's own per-report and setup lines only with --verbose; the loop prints one line per checkpoint
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")))


def _check_cpus(cfg: TrainConfig) -> None:
    """The workers and the data loader must fit at once, or Ray Data waits for CPUs forever."""
    import ray

    c = cfg.compute
    need, have = c.num_workers * c.cpus_per_worker + c.loader_cpus, ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(f"compute: {c.num_workers} workers × cpus_per_worker {c.cpus_per_worker} + loader_cpus "
                          f"{c.loader_cpus} = {need:g} CPUs, the cluster has {have:g}; lower compute.cpus_per_worker "
                          "or compute.num_workers")


def _log_model(cfg: TrainConfig, result, num_classes: int, run: JobRun) -> None:
    """The trained segmenter as an MLflow model (registered under ``tracking.register_as``)."""
    import mlflow.pytorch

    from wsss_core.models.segmenter import create_segmenter

    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, loop.CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model = create_segmenter(cfg.model.backbone, num_classes, None, cfg.model.head, cfg.model.output_stride)
    model.load_state_dict(state["model"])
    # pickle: the pt2 format would trace the model on an input example of one fixed size
    mlflow.pytorch.log_model(model.eval(), name="model", run_id=run.run_id, serialization_format="pickle",
                             registered_model_name=cfg.tracking.register_as)


def _keep_registered_checkpoints(cfg: TrainConfig, result) -> str | None:
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


def run_train(cfg: TrainConfig, log=print) -> TrainSummary:
    t0 = time.perf_counter()
    check_credentials_reach_workers(cfg.ray_address, cfg.dataset.storage)
    storage.export_credentials(cfg.dataset.storage)
    cfg = cfg.model_copy(update={"output": cfg.output.rstrip("/")})
    ds = open_dataset(cfg.dataset)
    data.check_pseudo_masks(cfg, ds.ids)
    val_payload, val_ids = _val(cfg)
    init_ray(cfg.ray_address, cfg.dataset.storage)
    quiet_ray()
    _check_cpus(cfg)
    payload = cfg.dataset.worker_payload()
    names = ["background", *ds.classes.names]
    loop_config = {"cfg": cfg.model_dump(mode="json") | {"dataset": payload}, "num_classes": len(names),
                   "class_names": names, "val_dataset": val_payload, "val_ids": val_ids}
    summary = TrainSummary(output=cfg.output)
    state = _state(cfg)
    log(f"[wsss train] {ds.uri} split {cfg.dataset.split}: {len(ds.ids)} images, "
        f"{'ground truth' if data.uses_ground_truth(cfg) else 'pseudo masks ' + cfg.train.pseudo_masks}, "
        f"{cfg.compute.num_workers} worker(s), {cfg.train.iterations} iterations -> {cfg.output}")
    with _job_run(cfg, ds, state) as run:
        if run is not None:
            loop_config["mlflow"] = {"tracking_uri": tracking_uri(), "run_id": run.run_id}
            summary.run_id, summary.run_url = run.run_id, run.url
            log(f"[wsss train] MLflow run: {run.url}")
        storage.write_text(storage.join(cfg.output, "train.json"), json.dumps(
            {"config": loop_config["cfg"], "mlflow_run_id": summary.run_id, "code": code_version()}, indent=2),
            cfg.dataset.storage)
        result = _trainer(cfg, loop_config, data.train_dataset(cfg, ds.ids, payload)).fit()
        summary.metrics = dict(result.metrics or {})
        summary.iterations = int(summary.metrics.get("iteration", 0))
        summary.val_miou = summary.metrics.get("val_miou")
        summary.checkpoint = _keep_registered_checkpoints(cfg, result)
        if run is not None:
            run.client.set_tag(run.run_id, "wsss.checkpoint", str(summary.checkpoint))
            _log_model(cfg, result, len(names), run)
    summary.seconds = time.perf_counter() - t0
    log(f"[wsss train] {summary.line()}")
    return summary


def _job_run(cfg: TrainConfig, ds, state: dict[str, Any]):
    import contextlib

    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    source = "ground truth" if data.uses_ground_truth(cfg) else f"pseudo masks (mu {cfg.train.mu})"
    name = cfg.tracking.run_name or f"train {os.path.basename(ds.uri.rstrip('/'))}/{cfg.dataset.split} segmenter {cfg.model.backbone}"
    tags = {"wsss.job": "train", "wsss.recipe": "segmenter", "wsss.dataset": ds.uri, "wsss.output": cfg.output,
            "wsss.model": f"{cfg.model.backbone} ({cfg.model.pretrained})", "wsss.labels": source,
            "wsss.code_version": code_version()["git_commit"][:12]}
    return JobRun(cfg.tracking.experiment, name, tags, f"Segmenter on {source} of {ds.uri}; checkpoints in {cfg.output}.",
                  flatten(cfg.model_dump(mode="json", exclude={"dataset": {"storage"}})),
                  resume_run_id=state.get("mlflow_run_id"))

"""``wsss predict``: a trained segmenter over a dataset split (driver side).

checkpoint (a ``wsss train`` checkpoint folder, or a training output: its latest) -> ids of the split
-> Ray Data: Loader actors (CPU, when there are GPUs) -> Predictor actors (one GPU each, else CPU) ->
``masks/`` + ``confidence/`` on the output URI -> ``manifest.parquet`` (one row per image, its
status and confusion counts), mIoU when the split has ground truth, one MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from wsss_platform import checkpoint, outputs, storage
from wsss_platform.config import ConfigError, flatten
from wsss_platform.console import Progress, quiet_ray
from wsss_platform.datasets import Dataset, keep_index, open_indexed
from wsss_platform.datasets.base import decode_mask
from wsss_platform.label.actors import Loader
from wsss_platform.label.job import confusion_from
from wsss_platform.predict.actors import LoadingPredictor, Predictor
from wsss_platform.predict.config import PredictConfig
from wsss_platform.ray_utils import (
    check_credentials_reach_workers,
    cluster_gpus,
    code_version,
    init_ray,
    record_items,
)
from wsss_platform.tracking import JobRun


@dataclass
class PredictSummary:
    output: str
    checkpoint: str = ""
    total: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    miou: float | None = None
    iou: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    run_id: str | None = None
    run_url: str | None = None

    def line(self) -> str:
        s = f"predicted {self.done}/{self.total} images ({self.failed} failed) in {self.seconds:.1f}s"
        if self.miou is not None:
            s += f"; mIoU {self.miou:.4f}"
        return s + f"; output {self.output}"


def _gpus(cfg: PredictConfig) -> tuple[float, int]:
    total = cluster_gpus()
    g = cfg.compute.gpus_per_actor
    gpus = (1.0 if total >= 1 else 0.0) if g == "auto" else float(g)
    if gpus > total:
        raise ConfigError(f"compute.gpus_per_actor={gpus} but the Ray cluster has {total:g} GPUs; set it to 0 or auto")
    return gpus, cfg.compute.max_actors or (max(1, int(total // gpus)) if gpus else 1)


def _pipeline(cfg: PredictConfig, ds: Dataset, ckpt: str):
    import ray

    gpus, actors = _gpus(cfg)
    reader = ds.reader_payload()
    rows = record_items(ds, list(ds.ids), max(1, min(len(ds.ids), 200)))
    kwargs: dict[str, Any] = {"config": cfg.model_dump(mode="json") | {"dataset": cfg.dataset.worker_payload()},
                              "checkpoint": ckpt, "gpus": gpus}
    predictor = Predictor
    if gpus:  # decoding on CPU actors keeps the GPUs busy
        rows = rows.map_batches(Loader, fn_constructor_kwargs={"reader": reader}, batch_size=cfg.compute.batch_size,
                                num_cpus=0.5, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2 * actors))
    else:
        predictor, kwargs = LoadingPredictor, kwargs | {"reader": reader}
    return rows.map_batches(predictor, fn_constructor_kwargs=kwargs, batch_size=cfg.compute.batch_size,
                            num_gpus=gpus, num_cpus=cfg.compute.cpus_per_actor,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))


def _check_classes(names: list[str], ds: Dataset, ckpt: str) -> None:
    if names[1:] != list(ds.classes.names):
        raise ConfigError(f"{ckpt} predicts {len(names) - 1} classes ({', '.join(names[1:6])}, …) but {ds.uri} has "
                          f"{len(ds.classes.names)} ({', '.join(ds.classes.names[:5])}, …); give a dataset with the classes "
                          "the segmenter was trained on")


def _predict(cfg: PredictConfig, ds: Dataset, ckpt: str, summary: PredictSummary) -> list[dict[str, Any]]:
    init_ray(cfg.ray_address, cfg.dataset.storage)
    quiet_ray()
    progress, rows, t0 = Progress("[wsss predict]", len(ds.ids)), [], time.perf_counter()
    for batch in _pipeline(cfg, ds, ckpt).iter_batches(batch_size=None, batch_format="numpy"):
        new = [json.loads(r) for r in batch["row"]]
        rows += new
        failed = sum(r["status"] == "failed" for r in new)
        progress.update(len(new) - failed, failed)
    progress.finish()
    summary.seconds = time.perf_counter() - t0
    return rows


def _manifest(cfg: PredictConfig, ds: Dataset, rows: list[dict[str, Any]], summary: PredictSummary) -> pa.Table:
    seen = {r["image_id"] for r in rows}
    rows = rows + [{"image_id": i, "status": "failed", "error": "no result (see the Ray logs)"}
                   for i in ds.ids if i not in seen]
    cols = {f.name for f in outputs.MANIFEST_SCHEMA}
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k in cols} for r in rows], schema=outputs.MANIFEST_SCHEMA)
    outputs.write_table(storage.join(cfg.output, "manifest.parquet"), table, cfg.dataset.storage)
    summary.done = sum(r["status"] == "done" for r in rows)
    summary.failed = len(rows) - summary.done
    summary.failures = [(r["image_id"], r["error"]) for r in rows if r["status"] == "failed"]
    names = ["background", *ds.classes.names]
    cm = confusion_from(table, "cm", len(names))
    if cm is not None:
        summary.miou, summary.iou = cm.miou(), dict(zip(names, cm.iou().tolist(), strict=True))
    return table


def run_predict(cfg: PredictConfig, log=print) -> PredictSummary:
    t_start = time.perf_counter()
    check_credentials_reach_workers(cfg.ray_address, cfg.dataset.storage)
    storage.export_credentials(cfg.dataset.storage)
    if not cfg.checkpoint:
        raise ConfigError("checkpoint: give a `wsss train` checkpoint folder or training output (--checkpoint URI)")
    cfg = cfg.model_copy(update={"output": cfg.output.rstrip("/")})
    ckpt = checkpoint.resolve(cfg.checkpoint, cfg.dataset.storage)
    ds, index = open_indexed(cfg.dataset, storage.join(cfg.output, outputs.INDEX))
    _check_classes(checkpoint.spec_of(checkpoint.load_state(ckpt, cfg.dataset.storage), ckpt)["class_names"], ds, ckpt)
    keep_index(ds, index, cfg.dataset.storage)
    summary = PredictSummary(output=cfg.output, checkpoint=ckpt, total=len(ds.ids))
    log(f"[wsss predict] {ds.uri} split {cfg.dataset.split}: {len(ds.ids)} images with {ckpt} -> {cfg.output}")
    info = {"config": cfg.model_dump(mode="json", exclude={"dataset": {"storage"}}), "checkpoint": ckpt,
            "code": code_version(), "started_at": time.time(), "classes": ds.class_mapping()}
    with _job_run(cfg, ds, ckpt) as run:
        if run is not None:
            summary.run_id, summary.run_url = run.run_id, run.url
            info |= {"mlflow_run_url": run.url, "mlflow_run_id": run.run_id, "mlflow_run_name": run.name}
        storage.write_text(storage.join(cfg.output, "run.json"), json.dumps(info, indent=2), cfg.dataset.storage)
        table = _manifest(cfg, ds, _predict(cfg, ds, ckpt, summary), summary)
        if run is not None:
            _track(cfg, ds, summary, table, run)
    for image_id, err in summary.failures[:10]:
        log(f"[wsss predict] failed {image_id}: {err}")
    log(f"[wsss predict] {summary.line()} (total {time.perf_counter() - t_start:.1f}s)")
    return summary


def _job_run(cfg: PredictConfig, ds: Dataset, ckpt: str):
    import contextlib

    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    data = f"{os.path.basename(ds.uri.rstrip('/'))}/{cfg.dataset.split}"
    tags = {"wsss.job": "predict", "wsss.dataset": ds.uri, "wsss.split": cfg.dataset.split, "wsss.checkpoint": ckpt,
            "wsss.output": cfg.output, "wsss.code_version": code_version()["git_commit"][:12]}
    return JobRun(cfg.tracking.experiment, cfg.tracking.run_name or f"predict {data}",
                  tags, f"Segmenter {ckpt} over {ds.uri} (split {cfg.dataset.split}); masks in {cfg.output}.",
                  flatten(cfg.model_dump(mode="json", exclude={"dataset": {"storage"}})))


def _track(cfg: PredictConfig, ds: Dataset, summary: PredictSummary, table: pa.Table, run: JobRun) -> None:
    from wsss_platform.preview import colour, panels

    run.log_split(ds, "prediction")
    metrics = {"images_done": summary.done, "images_failed": summary.failed,
               "images_per_s": summary.done / summary.seconds if summary.seconds else 0.0}
    if summary.miou is not None:
        metrics |= {"miou": summary.miou} | {f"iou/{k}": v for k, v in summary.iou.items() if v == v}
        seen = [k for k, v in summary.iou.items() if v == v]  # NaN: a class neither predicted nor present
        run.log_table({"class": seen, "iou": [round(summary.iou[k], 4) for k in seen]}, "per_class_iou.json")
    run.log_metrics(metrics, step=summary.done)
    cells = []
    for image_id in [r["image_id"] for r in table.select(["image_id", "status"]).to_pylist()
                     if r["status"] == "done"][: cfg.tracking.preview_images]:
        row = ds.load(image_id)
        pred = decode_mask(storage.read_bytes(outputs.mask_uri(cfg.output, image_id), cfg.dataset.storage), image_id)
        cells.append((image_id, [("image", row.image, False), ("prediction", colour(pred, row.image), True),
                                 ("ground truth", colour(row.mask, row.image), True)]))
    if cells:
        run.log_bytes(panels(cells), "preview.png")


def exit_code(summary: PredictSummary) -> int:
    return 1 if summary.failed else 0



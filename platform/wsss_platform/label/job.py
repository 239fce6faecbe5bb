"""``wsss label``: the distributed labeling job (driver side).

ids of the split -> skip complete ones (resume) -> Ray Data: Loader actors (CPU) -> Labeler actors
(one GPU each when the cluster has GPUs) -> files + manifest parts on the output URI. The driver
then merges the parts into ``manifest.parquet``, scores the masks against ground truth, and logs
one MLflow run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wsss_core.metrics import ConfusionMatrix
from wsss_core.regions import LAYERS_KEY
from wsss_core.registry import REFINERS, create_refiner
from wsss_platform import outputs, storage
from wsss_platform.config import flatten
from wsss_platform.console import Progress, quiet_ray
from wsss_platform.datasets import Dataset, keep_index, open_indexed
from wsss_platform.datasets.base import decode_mask
from wsss_platform.label.actors import Labeler, Loader, LoadingLabeler, memory_per_actor
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import check_model_paths, check_stages, class_set, refiner_kwargs
from wsss_platform.ownership import OutputLock, fingerprint, refuse_changed
from wsss_platform.preview import PreviewRow, grid, iou_chart
from wsss_platform.ray_utils import (
    check_credentials_reach_workers,
    cluster_gpus,
    code_version,
    init_ray,
    record_items,
)
from wsss_platform.tracking import JobRun


@dataclass
class LabelSummary:
    output: str
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    processed: int = 0
    seconds: float = 0.0
    miou_raw: float | None = None
    miou: float | None = None
    iou_raw: dict[str, float] = field(default_factory=dict)
    iou: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    run_url: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed_fraction(self) -> float:
        return self.failed / self.total if self.total else 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        s = (f"labelled {self.done}/{self.total} images ({self.failed} failed, {self.skipped} already complete) "
             f"in {self.seconds:.1f}s ({self.images_per_s:.1f} img/s)")
        if self.miou is not None:
            s += f"; mIoU raw CAM {self.miou_raw:.4f} -> refined {self.miou:.4f}"
        return s + f"; output {self.output}"


def confusion_from(table: pa.Table, prefix: str, num_labels: int) -> ConfusionMatrix | None:
    idx = table.column(f"{prefix}_index").to_pylist()
    cnt = table.column(f"{prefix}_count").to_pylist()
    if not any(i for i in idx if i):
        return None
    flat = np.zeros(num_labels * num_labels, dtype=np.int64)
    for i, c in zip(idx, cnt, strict=True):
        if i:
            np.add.at(flat, np.asarray(i, dtype=np.int64), np.asarray(c, dtype=np.int64))
    return ConfusionMatrix.from_list(flat.reshape(num_labels, num_labels).tolist())


def _actor_pool(cfg: LabelConfig) -> tuple[float, int, int]:
    gpus_total = cluster_gpus()
    gpus = (1.0 if gpus_total >= 1 else 0.0) if cfg.compute.gpus_per_actor == "auto" else float(cfg.compute.gpus_per_actor)
    if gpus > 0 and gpus_total == 0:
        raise RuntimeError(f"compute.gpus_per_actor={gpus} but the Ray cluster has no GPUs; set it to 0 or auto")
    default_max = max(1, int(gpus_total // gpus)) if gpus > 0 else 1
    max_actors = cfg.compute.max_actors or default_max
    return gpus, min(cfg.compute.min_actors, max_actors), max_actors


def _pipeline(cfg: LabelConfig, ds: Dataset, todo: list[str], token: str, isolate: bool = False):
    """The Ray Data pipeline over ``todo``; ``isolate``: one image a batch (the pass after failures)."""
    import ray

    gpus, min_actors, max_actors = _actor_pool(cfg)
    loaders = cfg.compute.loader_actors
    if loaders == "auto":
        loaders = 2 if gpus > 0 else 0
    batch_size = 1 if isolate else cfg.compute.batch_size
    load_batch = 1 if isolate else cfg.compute.loader_batch_size
    rows = record_items(ds, todo, max(1, min(len(todo), len(todo) // load_batch)))
    reader = ds.reader_payload()
    labeler_kwargs = {"config": cfg.model_dump(mode="json") | {"dataset": cfg.dataset.worker_payload()},
                      "class_names": list(ds.classes.names), "gpus": gpus, "job_token": token}
    if loaders:
        rows = rows.map_batches(
            Loader, fn_constructor_kwargs={"reader": reader},
            batch_size=load_batch, batch_format="numpy", num_cpus=0.5,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=loaders))
        labeler = Labeler
    else:
        labeler, labeler_kwargs = LoadingLabeler, labeler_kwargs | {"reader": reader}
    memory = memory_per_actor(cfg)
    _check_memory(memory)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args but has no named parameter for max_task_retries yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        labeled = rows.map_batches(
            labeler, fn_constructor_kwargs=labeler_kwargs,
            batch_size=batch_size, batch_format="numpy", num_gpus=gpus, num_cpus=cfg.compute.cpus_per_actor,
            memory=memory, compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            # A batch is retried a bounded number of times; its in-flight marker lets each retry isolate
            # the image that killed the worker (Labeler). Actor restarts stay unbounded (Ray Data's
            # default) on purpose: Ray Data 2.60's pool never replaces an actor that used up
            # max_restarts, so a bound there would stall the pipeline instead of ending it.
            max_task_retries=cfg.compute.max_batch_attempts - 1, max_restarts=-1)
    # A batch that used up its attempts is dropped rather than ending the job: its images get no
    # manifest row and are redone one by one (``_label``), where a failure is that image's alone. Set
    # on this dataset's own context: the process-wide one would also let a training started later in
    # the same process skip the batches of a damaged input.
    labeled.context.max_errored_blocks = -1
    return labeled


def _check_memory(memory: int | None) -> None:
    """An actor that asks for more memory than any node has would wait for ever: refuse it."""
    import ray

    biggest = max((n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if memory and biggest and memory > biggest:
        from wsss_platform.config import ConfigError

        raise ConfigError(f"compute.memory_per_actor: {memory / 2**30:.1f} GiB per labeling actor (auto follows "
                          f"dataset.max_image_pixels) but the largest node offers {biggest / 2**30:.1f} GiB; lower "
                          "dataset.max_image_pixels, or set compute.memory_per_actor (bytes, or null for no limit)")


def label_settings(cfg: LabelConfig, source: str | None = None) -> dict[str, Any]:
    """What shapes the masks: an output holds the results of one such setting (DESIGN.md), and of
    one version of the annotations (``source``: the dataset's source fingerprint)."""
    settings = cfg.model_dump(mode="json", include={"cam_source", "refine", "model", "text", "mask",
                                                    *(r for r in cfg.refine if r in LabelConfig.model_fields)})
    settings["dataset"] = cfg.dataset.model_dump(mode="json", include={"uri", "layout", "split", "labels_from",
                                                                       "labels_file"})
    if source is not None:  # a changed annotation file (another index fingerprint) is another labeling
        settings["dataset"]["annotations"] = source
    return settings


def _previous_settings(run: dict[str, Any]) -> dict[str, Any]:
    if "settings" in run:
        return run["settings"]
    try:  # outputs written before settings were recorded
        return label_settings(LabelConfig.model_validate(run.get("config", {})))
    except Exception:
        return {}


def claim_output(cfg: LabelConfig, log, source: str | None = None) -> None:
    """Make the (locked) output this run's: refuse one made with other settings, clear it on
    --overwrite, drop what killed runs left (in-flight markers, temporary files)."""
    out, opts = cfg.output, cfg.dataset.storage
    run_uri = storage.join(out, "run.json")
    if cfg.overwrite:
        for name in outputs.RESULTS:
            storage.remove(storage.join(out, name), opts)
    elif storage.exists(run_uri, opts) and storage.list_names(storage.join(out, outputs.PARTS), opts):
        try:
            old = _previous_settings(json.loads(storage.read_text(run_uri, opts)))
        except ValueError:
            old = {}
        new = label_settings(cfg, source)
        for key in ("labels_file", "annotations"):  # outputs written before these were recorded compare without them
            if key not in old.get("dataset", {}):
                new["dataset"].pop(key, None)
        if fingerprint(old) != fingerprint(new):
            refuse_changed(out, old, new, "pseudo masks")
    storage.remove(storage.join(out, outputs.INFLIGHT), opts)
    if removed := storage.sweep_temporaries(out):
        log(f"[wsss label] removed {removed} temporary file(s) a killed run left in {out}")


def _run(pipeline, progress: Progress, run: JobRun | None) -> int:
    n = 0
    for batch in pipeline.iter_batches(batch_size=None, batch_format="numpy"):
        n += len(batch["image_id"])
        failed = int((batch["status"] == "failed").sum())
        if progress.update(len(batch["image_id"]) - failed, failed) and run is not None:
            run.log_metrics({"images_done": progress.done, "images_failed": progress.failed,
                             "images_per_s": progress.rate}, step=progress.done + progress.failed)
    return n


def _label(cfg: LabelConfig, ds: Dataset, todo: list[str], summary: LabelSummary, log, run: JobRun | None) -> None:
    """Label ``todo``: one pass in batches, then one image a batch for whatever got no result."""
    init_ray(cfg.ray_address, cfg.dataset.storage)
    quiet_ray()
    progress = Progress("[wsss label]", len(todo))
    token = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    summary.processed += _run(_pipeline(cfg, ds, todo, token), progress, run)
    have = set(outputs.read_parts(cfg.output, cfg.dataset.storage).column("image_id").to_pylist())
    missing = [i for i in todo if i not in have]
    if missing:
        log(f"[wsss label] {len(missing)} image(s) got no result in their batch (it failed "
            f"{cfg.compute.max_batch_attempts} times or killed its worker); labeling them one at a time")
        summary.processed += _run(_pipeline(cfg, ds, missing, token, isolate=True), progress, run)
    progress.finish()
    summary.seconds = time.perf_counter() - t0
    storage.remove(storage.join(cfg.output, outputs.INFLIGHT), cfg.dataset.storage)


def _preview(cfg: LabelConfig, ds: Dataset, manifest: pa.Table) -> bytes | None:
    done = [r for r in manifest.select(["image_id", "status"]).to_pylist() if r["status"] == "done"]
    names = ["background", *ds.classes.names]
    # a refiner whose image stage gives regions runs that stage again on the driver for these few images;
    # the actors' proposals are not kept (a SAM mask set is as large as ~100 pseudo masks)
    stages = [create_refiner(n, **refiner_kwargs(cfg, n)) for n in cfg.refine
              if LAYERS_KEY in getattr(REFINERS.get(n), "image_aux_keys", ())]
    rows = []
    for r in done[: cfg.tracking.preview_images]:
        row = ds.load(r["image_id"])
        mask = decode_mask(storage.read_bytes(outputs.mask_uri(cfg.output, r["image_id"]), cfg.dataset.storage), "mask")
        if cfg.cache == "none":  # no CAMs kept: the preview shows image, mask and ground truth
            cams, labels = np.zeros((0, 1, 1), np.float32), []
        else:
            data = outputs.decode_cams(storage.read_bytes(outputs.cams_uri(cfg.output, r["image_id"]), cfg.dataset.storage))
            cams, labels = data["cams"].astype(np.float32), data["labels"].tolist()
        regions = [a[LAYERS_KEY].numpy() for s in stages for a in s.image_aux([row.image]) if LAYERS_KEY in a]
        rows.append(PreviewRow(r["image_id"], row.image, cams, [names[int(c)] for c in labels], mask, row.mask,
                               regions[0] if regions else None))
    return grid(rows) if rows else None


def run_label(cfg: LabelConfig, log=print) -> LabelSummary:
    """Run the labeling job to completion; returns the summary (the caller decides the exit code)."""
    t_start = time.perf_counter()
    check_credentials_reach_workers(cfg.ray_address, cfg.dataset.storage)
    storage.export_credentials(cfg.dataset.storage)
    check_model_paths(cfg)
    cfg = cfg.model_copy(update={"output": cfg.output.rstrip("/")})
    out, opts = cfg.output, cfg.dataset.storage
    ds, index = open_indexed(cfg.dataset, storage.join(out, outputs.INDEX))
    check_stages(cfg, class_set(list(ds.classes.names), cfg))
    source = ds.source
    with OutputLock(out, opts, "wsss label"):
        claim_output(cfg, log, source)
        keep_index(ds, index, opts)
        previous = outputs.read_parts(out, opts)
        complete = {r["image_id"] for r in previous.select(["image_id", "status"]).to_pylist() if r["status"] == "done"}
        todo = [i for i in ds.ids if i not in complete]
        summary = LabelSummary(output=out, total=len(ds.ids), skipped=len(ds.ids) - len(todo))
        log(f"[wsss label] {ds.uri} ({cfg.dataset.layout}, split {cfg.dataset.split}): {len(ds.ids)} images, "
            f"{summary.skipped} already complete, {len(todo)} to do -> {out}")
        if not todo:
            return _nothing_to_do(cfg, ds, summary, log)
        settings = label_settings(cfg, source)
        run_info = {"config": cfg.model_dump(mode="json"), "settings": settings, "fingerprint": fingerprint(settings),
                    "code": code_version(), "classes": ds.class_mapping(), "started_at": time.time(),
                    "ray_address": cfg.ray_address}
        with job_run(cfg, ds, len(todo)) as run:
            if run is not None:
                summary.run_id, summary.run_url = run.run_id, run.url
                run_info |= {"mlflow_run_url": run.url, "mlflow_run_id": run.run_id, "mlflow_run_name": run.name}
                log(f"[wsss label] MLflow run: {run.url}")
            storage.write_text(storage.join(out, "run.json"), json.dumps(run_info, indent=2), opts)
            _label(cfg, ds, todo, summary, log, run)
            manifest = _write_manifest(cfg, ds, summary)
            _score(manifest, ds, summary)
            if run is not None:
                _track(cfg, ds, summary, manifest, run_info, run)
    for image_id, err in summary.failures[:10]:
        log(f"[wsss label] failed {image_id}: {err}")
    log(f"[wsss label] {summary.line()} (total {time.perf_counter() - t_start:.1f}s)")
    return summary


def _nothing_to_do(cfg: LabelConfig, ds: Dataset, summary: LabelSummary, log) -> LabelSummary:
    """A rerun with every image complete: the summary from the output, and no new MLflow run."""
    manifest = _write_manifest(cfg, ds, summary)
    _score(manifest, ds, summary)
    with contextlib.suppress(storage.StorageError, ValueError):
        summary.run_url = json.loads(storage.read_text(storage.join(cfg.output, "run.json"), cfg.dataset.storage)).get(
            "mlflow_run_url")
    # its MLflow run's URL is the command's last line, as after any labeling
    log(f"[wsss label] nothing to do: every image of the split is complete in {cfg.output} (--overwrite redoes it)")
    return summary


NO_RESULT = "no result: its batch failed every attempt, alone too (see the Ray logs); a rerun tries it again"


def _write_manifest(cfg: LabelConfig, ds: Dataset, summary: LabelSummary) -> pa.Table:
    """Merge the parts into ``manifest.parquet``: one row per image of the split, each with a status."""
    out, opts = cfg.output, cfg.dataset.storage
    parts = outputs.read_parts(out, opts)
    manifest = parts.filter(pc.is_in(parts.column("image_id"), value_set=pa.array(ds.ids)))
    seen = set(manifest.column("image_id").to_pylist())
    lost = [{"image_id": i, "status": "failed", "error": NO_RESULT} for i in ds.ids if i not in seen]
    if lost:
        manifest = pa.concat_tables([manifest, pa.Table.from_pylist(lost, schema=outputs.MANIFEST_SCHEMA)])
    outputs.write_table(storage.join(out, "manifest.parquet"), manifest, opts)
    statuses = manifest.column("status").to_pylist()
    summary.done, summary.failed = statuses.count("done"), statuses.count("failed")
    summary.failures = [(r["image_id"], r["error"]) for r in manifest.select(["image_id", "status", "error"]).to_pylist()
                        if r["status"] == "failed"]
    return manifest


def _score(manifest: pa.Table, ds: Dataset, summary: LabelSummary) -> None:
    names = ["background", *ds.classes.names]
    for prefix, attr in (("cm_raw", "raw"), ("cm", "")):
        cm = confusion_from(manifest, prefix, len(names))
        if cm is not None:
            iou = dict(zip(names, cm.iou().tolist(), strict=True))
            if attr:
                summary.miou_raw, summary.iou_raw = cm.miou(), iou
            else:
                summary.miou, summary.iou = cm.miou(), iou


RANDOM_NOTE = "random weights (model.pretrained: none): the CAMs, masks and mIoU of this run are meaningless"


def method_name(cfg: LabelConfig) -> str:
    return "+".join([cfg.cam_source, *cfg.refine])


def run_name(cfg: LabelConfig) -> str:
    data = os.path.basename(cfg.dataset.uri.rstrip("/")) or cfg.dataset.uri
    return cfg.tracking.run_name or f"label {data}/{cfg.dataset.split} {method_name(cfg)}"


@contextlib.contextmanager
def job_run(cfg: LabelConfig, ds: Dataset, todo: int) -> Iterator[JobRun | None]:
    """The job's MLflow run, open while it works (None when tracking is off)."""
    if not cfg.tracking.enabled:
        yield None
        return
    random = cfg.model.pretrained.lower() in ("", "none")
    desc = (f"Pseudo masks for {todo} images of {ds.uri} (split {cfg.dataset.split}) with {method_name(cfg)} on "
            f"{cfg.model.name}, written to {cfg.output}." + (f"\n\n**{RANDOM_NOTE}**" if random else ""))
    tags = {"wsss.job": "label", "wsss.dataset": ds.uri, "wsss.split": cfg.dataset.split,
            "wsss.model": f"{cfg.model.name} ({cfg.model.pretrained})", "wsss.cam_source": cfg.cam_source,
            "wsss.refiner": "+".join(cfg.refine) or "none", "wsss.output": cfg.output, "wsss.code_version": code_version()["git_commit"][:12]}
    if random:
        tags["wsss.warning"] = RANDOM_NOTE
    with JobRun(cfg.tracking.experiment, run_name(cfg), tags, desc, flatten(cfg.model_dump(mode="json"))) as run:
        run.log_split(ds, "labeling")
        yield run


def _track(cfg: LabelConfig, ds: Dataset, summary: LabelSummary, manifest: pa.Table, run_info: dict, run: JobRun) -> None:
    metrics = {"images_total": summary.total, "images_done": summary.done, "images_failed": summary.failed,
               "images_skipped": summary.skipped, "images_processed": summary.processed,
               "images_per_s": summary.images_per_s, "failed_fraction": summary.failed_fraction}
    if summary.miou is not None:
        metrics |= {"miou": summary.miou, "miou_raw": summary.miou_raw}
        metrics |= {f"iou/{k}": v for k, v in summary.iou.items()}
        metrics |= {f"iou_raw/{k}": v for k, v in summary.iou_raw.items()}
        run.log_table(per_class_table(summary.iou, summary.iou_raw), "per_class_iou.json")
        run.log_bytes(iou_chart(summary.iou, summary.iou_raw, f"per-class IoU, {run_name(cfg)}"), "per_class_iou.png")
    run.log_metrics(metrics, step=summary.done + summary.failed)
    if summary.failed_fraction > cfg.max_failed_fraction:
        run.fail(f"{summary.failed} of {summary.total} images failed, above max_failed_fraction={cfg.max_failed_fraction}")
    run.log_bytes(json.dumps(run_info, indent=2).encode(), "run.json")
    buf = io.BytesIO()
    pq.write_table(manifest, buf)
    run.log_bytes(buf.getvalue(), "manifest.parquet")
    preview = _preview(cfg, ds, manifest) if cfg.tracking.preview_images else None
    if preview:
        run.log_bytes(preview, "preview.png")


def per_class_table(iou: dict[str, float], iou_raw: dict[str, float]) -> dict[str, list[Any]]:
    names = [k for k in iou if iou[k] == iou[k] or iou_raw.get(k) == iou_raw.get(k)]
    return {"class": names, "iou": [round(iou[k], 4) if iou[k] == iou[k] else None for k in names],
            "iou_raw_cam": [round(iou_raw[k], 4) if iou_raw.get(k) == iou_raw.get(k) else None for k in names]}


def main_exit_code(summary: LabelSummary, cfg: LabelConfig) -> int:
    if summary.failed_fraction > cfg.max_failed_fraction:
        print(f"[wsss label] {summary.failed} of {summary.total} images failed ({summary.failed_fraction:.1%}), "
              f"above max_failed_fraction={cfg.max_failed_fraction}; see manifest.parquet", file=sys.stderr)
        return 1
    return 0

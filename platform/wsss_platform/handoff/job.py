"""``wsss export`` and ``wsss import`` (driver side; file work, no Ray).

export: a labeling or prediction output -> its review order (``review.parquet``, and a table on its
MLflow run) -> the N most doubtful images (or all) in an annotation tool's format -> ``--output``.
import: the tool's export of the annotators' work + the labeling output it started from -> a new
labeling-output folder (``pseudo/``, ``confidence/``, ``masks/``, ``manifest.parquet``, ``run.json``)
that ``wsss train segmenter train.pseudo_masks=…`` reads, and what the people changed.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wsss_core.metrics import ConfusionMatrix
from wsss_core.review import changed_share
from wsss_platform import outputs, storage
from wsss_platform.datasets.base import encode_mask_png
from wsss_platform.handoff.formats import FORMATS, Item
from wsss_platform.handoff.review import log_review, review_table, write_review
from wsss_platform.handoff.source import MaskOutput, open_output
from wsss_platform.storage import StorageOptions


@dataclass
class ExportConfig:
    source: str
    format: str
    output: str
    review: int | None = None
    """Export only the ``review`` most doubtful images (all when None)."""
    order: str = "doubt"
    image_url: str = "{uri}"
    """Each task's image: ``{uri}`` (the image's URI), ``{path}`` (its path under the dataset root), ``{id}``."""
    against: str | None = None
    mu: float | None = None
    overwrite: bool = False
    options: StorageOptions = field(default_factory=StorageOptions)


@dataclass
class ExportSummary:
    output: str
    exported: list[str]
    left_out_failed: list[str]
    files: list[str]
    review_uri: str
    run_id: str | None
    """The output's MLflow run that got the review table, ``table`` (None: no run in this tracking store)."""
    table: str | None


def refuse_existing(folder: str, names: tuple[str, ...], overwrite: bool, options: StorageOptions) -> None:
    there = [n for n in names if storage.exists(storage.join(folder, n), options)]
    if there and not overwrite:
        raise ValueError(f"--output: {storage.join(folder, there[0])} exists; write into a new folder, or pass "
                         "--overwrite to replace it")


def image_url(src: MaskOutput, template: str, image_id: str) -> str:
    uri = src.dataset.image_uri(image_id)
    return template.format(uri=uri, path=uri[len(src.dataset.uri.rstrip("/")) + 1:], id=image_id)


def run_export(cfg: ExportConfig, log=print) -> ExportSummary:
    fmt = FORMATS[cfg.format]()
    out = cfg.output.rstrip("/")
    refuse_existing(out, (*fmt.files, "review.parquet", "export.json"), cfg.overwrite, cfg.options)
    src = open_output(cfg.source, cfg.mu, cfg.options)
    against = open_output(cfg.against, cfg.mu, cfg.options) if cfg.against else None
    try:  # a bad template fails here, not after every image was read
        if src.done:
            image_url(src, cfg.image_url, src.done[0])
    except (KeyError, IndexError) as e:
        raise ValueError(f"--image-url: {cfg.image_url!r} names {e}; use {{uri}}, {{path}} or {{id}}") from None
    log(f"[wsss export] {src.uri} ({src.kind}): {len(src.done)} images, {len(src.failed)} failed (left out); "
        f"scoring doubt (mu {src.mu})")
    table = review_table(src, against, cfg.order)
    rows = table.to_pylist()[: cfg.review] if cfg.review else table.to_pylist()
    items = (Item(r["image_id"], src.mask(r["image_id"]), src.confidence(r["image_id"]), r["doubt"],
                  image_url(src, cfg.image_url, r["image_id"])) for r in rows)
    files = fmt.export(src, items)  # every file in memory: nothing is written when an image fails
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data, cfg.options)
    review_uri = write_review(table, out, cfg.options)
    exported = [r["image_id"] for r in rows]
    storage.write_text(storage.join(out, "export.json"), json.dumps({
        "source": src.uri, "format": cfg.format, "classes": src.classes, "images": exported,
        "left_out_failed": src.failed, "order": cfg.order, "mu": src.mu, "created_at": time.time()}, indent=1),
        cfg.options)
    logged = log_review(src, table)
    summary = ExportSummary(out, exported, src.failed, [storage.join(out, n) for n in files], review_uri,
                            src.run_id if logged else None, logged)
    if src.failed:
        log(f"[wsss export] left out {len(src.failed)} failed images: {', '.join(src.failed[:10])}"
            + (" …" if len(src.failed) > 10 else ""))
    log(f"[wsss export] {len(exported)} images ({cfg.order} order) as {cfg.format}: {', '.join(summary.files)}; "
        f"review order: {review_uri}" + (f" (and {logged} on MLflow run {src.run_id})" if logged else ""))
    return summary


@dataclass
class ImportConfig:
    format: str
    source: str
    """The annotation tool's export file (Label Studio: its JSON export; CVAT: the 'Segmentation mask 1.1' zip)."""
    pseudo: str
    """The labeling output the export was made from: its masks stand for every image nobody corrected."""
    dataset: str | None = None
    output: str = ""
    mu: float | None = None
    overwrite: bool = False
    options: StorageOptions = field(default_factory=StorageOptions)


@dataclass
class ImportSummary:
    output: str
    corrected: list[str]
    changed: float
    """The share of the corrected images' pixels whose label people changed."""
    iou: dict[str, float]
    """Per class: IoU of the pseudo mask against the correction, over the corrected images."""
    miou: float


def read_corrections(cfg: ImportConfig, src: MaskOutput) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What people drew, checked against the labeling output (known images, the same sizes): per image
    the correction and the pseudo mask it corrects."""
    corrections = FORMATS[cfg.format]().read(storage.read_bytes(cfg.source, cfg.options), cfg.source, src.classes)
    done, pairs = set(src.done), {}
    for image_id, mask in corrections.items():
        if image_id not in done:
            raise ValueError(f"--from: {cfg.source}: image {image_id!r} is not a labelled image of {src.uri}")
        pseudo = src.mask(image_id)
        if mask.shape != pseudo.shape:
            raise ValueError(f"--from: {cfg.source}: image {image_id} is {mask.shape[1]}x{mask.shape[0]} there but "
                             f"{pseudo.shape[1]}x{pseudo.shape[0]} in {src.uri}; export and import the same images")
        pairs[image_id] = mask, pseudo
    return pairs


def run_import(cfg: ImportConfig, log=print) -> ImportSummary:
    out = cfg.output.rstrip("/")
    if not out:
        raise ValueError("--output: give the folder for the corrected pseudo masks")
    refuse_existing(out, ("run.json", "manifest.parquet"), cfg.overwrite, cfg.options)
    src = open_output(cfg.pseudo, cfg.mu, cfg.options)
    if cfg.dataset:
        src.dataset_cfg = src.dataset_cfg.model_copy(update={"uri": cfg.dataset})
    missing = sorted(set(src.done) - set(src.dataset.ids))
    if missing:
        raise ValueError(f"--dataset: {src.dataset.uri} lacks {len(missing)} images of {src.uri} (e.g. {missing[0]})")
    pairs = read_corrections(cfg, src)
    corrections = {image_id: mask for image_id, (mask, _) in pairs.items()}
    log(f"[wsss import] {len(corrections)} corrected images from {cfg.source}; the other "
        f"{len(src.done) - len(corrections)} keep their pseudo masks from {src.uri} -> {out}")
    cm, changed = ConfusionMatrix(len(src.classes) + 1), []
    for mask, pseudo in pairs.values():
        cm.update(pseudo, mask)
        changed.append(changed_share(pseudo, mask) * mask.size)

    def write(image_id: str) -> None:
        if image_id in corrections:
            mask = corrections[image_id]
            files = {outputs.pseudo_uri: encode_mask_png(mask), outputs.mask_uri: encode_mask_png(mask),
                     outputs.confidence_uri: outputs.encode_confidence_png(np.ones(mask.shape, dtype=np.float32))}
        else:  # as labelled, byte for byte (masks/ was cut at the unrounded confidence)
            files = {outputs.pseudo_uri: storage.read_bytes(src.mask_file(image_id), cfg.options),
                     outputs.confidence_uri: storage.read_bytes(outputs.confidence_uri(src.uri, image_id), cfg.options),
                     outputs.mask_uri: storage.read_bytes(outputs.mask_uri(src.uri, image_id), cfg.options)
                     if src.kind == "label" else encode_mask_png(np.where(
                         src.confidence(image_id) < src.mu, 255, src.mask(image_id)).astype(np.uint8))}
        for uri_of, data in files.items():
            storage.write_bytes(uri_of(out, image_id), data, cfg.options)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, src.done))
    pixels = sum(m.size for m in corrections.values())
    summary = ImportSummary(out, sorted(corrections), float(sum(changed) / pixels) if pixels else 0.0,
                            dict(zip(src.classes, cm.iou().tolist()[1:], strict=True)),
                            cm.miou() if corrections else float("nan"))
    _finish_import(cfg, src, summary)
    log(f"[wsss import] people changed {summary.changed:.1%} of the corrected images' pixels; mIoU of the pseudo "
        f"masks against the corrections {summary.miou:.4f}; per class: "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary.iou.items() if v == v))
    log(f"[wsss import] train on it: wsss train segmenter ... train.pseudo_masks={out}")
    return summary


def _finish_import(cfg: ImportConfig, src: MaskOutput, summary: ImportSummary) -> None:
    """run.json (the labeling's, with where the corrections came from) and the manifest, written last: until
    they are there the folder is no labeling output that training would read."""
    info = json.loads(storage.read_text(storage.join(src.uri, "run.json"), cfg.options))
    info["imported"] = {"from": cfg.source, "format": cfg.format, "pseudo_masks": src.uri, "corrected": summary.corrected,
                        "changed": summary.changed, "iou": summary.iou, "miou": summary.miou, "at": time.time()}
    info["config"] = {**info.get("config", {}), "output": summary.output}
    corrected = set(summary.corrected)
    table = pa.table({"image_id": src.done, "status": ["done"] * len(src.done),
                      "corrected": [i in corrected for i in src.done]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(summary.output, "manifest.parquet"), buf.getvalue(), cfg.options)
    storage.write_text(storage.join(summary.output, "run.json"), json.dumps(info, indent=2), cfg.options)

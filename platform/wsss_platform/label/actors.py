"""The Ray Data callable classes of the labeling pipeline: load on CPU, label on GPU (or CPU).

Each class builds its heavy state once in ``__init__`` (the dataset index; the model and text
features) and is then called batch after batch by Ray Data's actor pool.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from wsss_core.metrics import ConfusionMatrix
from wsss_platform import storage
from wsss_platform.datasets import DatasetConfig, DatasetError, open_dataset
from wsss_platform.datasets.base import encode_mask_png
from wsss_platform.label import outputs
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import build_cam_source, class_set, device_for

EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)
EMPTY_MASK = np.zeros((0, 0), np.uint8)


def _objects(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


class Loader:
    """Reads and decodes images (and ground truth) by id; a failure becomes an ``error`` string.

    Reads run on a few threads: object-store latency overlaps, and PIL decodes without the GIL.
    """

    def __init__(self, dataset: dict[str, Any], threads: int = 4) -> None:
        self.ds = open_dataset(DatasetConfig.model_validate(dataset))
        self.pool = ThreadPoolExecutor(max_workers=threads)

    def _load(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, float]:
        t0 = time.perf_counter()
        try:
            row = self.ds.load(image_id)
            mask = row.mask if row.mask is not None else EMPTY_MASK
            return row.image, np.asarray(row.labels, dtype=np.int32), mask, "", time.perf_counter() - t0
        except (DatasetError, storage.StorageError, OSError) as e:
            return EMPTY_IMAGE, np.zeros(0, np.int32), EMPTY_MASK, str(e), time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded = list(self.pool.map(self._load, [str(i) for i in batch["image_id"]]))
        images, labels, masks, errors, seconds = (list(col) for col in zip(*loaded, strict=True)) if loaded else ([],) * 5
        return {"image_id": np.asarray(batch["image_id"]), "image": _objects(images), "labels": _objects(labels),
                "mask": _objects(masks), "error": np.asarray(errors, dtype=object),
                "seconds_load": np.asarray(seconds, np.float32)}


def sparse_confusion(pred: torch.Tensor, gt: np.ndarray, num_classes: int) -> tuple[list[int], list[int]]:
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, gt)
    flat = cm.matrix.reshape(-1)
    idx = torch.nonzero(flat).reshape(-1)
    return idx.tolist(), flat[idx].tolist()


class Labeler:
    """Computes CAMs, refinement and pseudo masks for a batch and writes them to the output URI."""

    def __init__(self, config: dict[str, Any], class_names: list[str], gpus: float) -> None:
        self.cfg = LabelConfig.model_validate(config)
        if self.cfg.compute.torch_threads:
            torch.set_num_threads(self.cfg.compute.torch_threads)
        self.classes = class_set(class_names, self.cfg)
        self.device = device_for(gpus)
        self.source = build_cam_source(self.cfg, self.classes, self.device)
        self.num_labels = self.classes.num_classes + 1
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.io = ThreadPoolExecutor(max_workers=8)

    def _write(self, image_id: str, res, size: tuple[int, int]) -> None:
        out, opts = self.cfg.output, self.cfg.dataset.storage
        storage.write_bytes(outputs.cams_uri(out, image_id), outputs.encode_cams(
            res.cams.numpy(), res.attn.numpy(), res.labels, size, res.class_scores.numpy()), opts)
        storage.write_bytes(outputs.mask_uri(out, image_id), encode_mask_png(res.mask_conf.numpy()), opts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        errors = [str(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        results = {}
        if ok:
            try:
                res = self.source([batch["image"][i] for i in ok], [list(batch["labels"][i]) for i in ok])
                results = dict(zip(ok, res, strict=True))
            except Exception as e:  # a bad batch must not take down the job: its images fail, loudly
                for i in ok:
                    errors[i] = f"labeling failed: {type(e).__name__}: {e}"
        per_image = (time.perf_counter() - t0) / max(1, len(ok))
        futures = [self.io.submit(self._write, ids[i], r, tuple(batch["image"][i].shape[:2])) for i, r in results.items()]
        for i, f in zip(results, futures, strict=True):
            try:
                f.result()
            except storage.StorageError as e:
                errors[i] = str(e)
        now = time.time()
        for i, image_id in enumerate(ids):
            row: dict[str, Any] = {"image_id": image_id, "error": errors[i], "worker": self.worker, "finished_at": now,
                                   "seconds_load": float(batch["seconds_load"][i]), "labels": [int(x) for x in batch["labels"][i]]}
            r = results.get(i)
            if r is None or errors[i]:
                row["status"] = "failed"
                rows.append(row)
                continue
            h, w = batch["image"][i].shape[:2]
            gt = batch["mask"][i]
            row.update(status="done", height=h, width=w, seconds_infer=per_image,
                       fg_fraction=float((r.mask_conf > 0).logical_and(r.mask_conf < 255).float().mean()),
                       ignore_fraction=float((r.mask_conf == 255).float().mean()))
            if gt.size:
                row["cm_raw_index"], row["cm_raw_count"] = sparse_confusion(r.mask_raw, gt, self.num_labels)
                row["cm_index"], row["cm_count"] = sparse_confusion(r.mask, gt, self.num_labels)
            rows.append(row)
        outputs.write_part(self.cfg.output, rows, self.cfg.dataset.storage)
        return {"image_id": np.asarray(ids, dtype=object), "status": np.asarray([r["status"] for r in rows], dtype=object),
                "error": np.asarray(errors, dtype=object)}


class LoadingLabeler(Labeler):
    """Loader and Labeler in one actor: on CPU-only clusters a separate loader pool would compete
    with the labelers for the same cores and copy every decoded image between processes."""

    def __init__(self, config: dict[str, Any], class_names: list[str], gpus: float, dataset: dict[str, Any]) -> None:
        super().__init__(config, class_names, gpus)
        self.loader = Loader(dataset)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(self.loader(batch))

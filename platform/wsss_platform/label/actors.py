"""The Ray Data callable classes of the labeling pipeline: load on CPU, label on GPU (or CPU).

Each class builds its heavy state once in ``__init__`` (the dataset index; the model and text
features) and is then called batch after batch by Ray Data's actor pool.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from wsss_core.metrics import ConfusionMatrix
from wsss_core.types import PseudoMask
from wsss_platform import metrics, outputs, storage
from wsss_platform.datasets import DatasetError, RecordReader
from wsss_platform.datasets.base import encode_mask_png
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import build_pipeline, class_set, device_for

EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)
EMPTY_MASK = np.zeros((0, 0), np.uint8)


def _objects(values: list[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


class Loader:
    """Reads and decodes images (and ground truth) from the rows' records; a failure becomes an
    ``error`` string. It holds a reader of a few settings, never the dataset's index.

    Reads run on a few threads: object-store latency overlaps, and PIL decodes without the GIL.
    """

    def __init__(self, reader: dict[str, Any], threads: int = 4) -> None:
        self.reader = RecordReader(reader)
        self.pool = ThreadPoolExecutor(max_workers=threads)

    def _load(self, image_id: str, record: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, float]:
        t0 = time.perf_counter()
        try:
            row = self.reader.load(record)
            mask = row.mask if row.mask is not None else EMPTY_MASK
            return row.image, np.asarray(row.labels, dtype=np.int32), mask, "", time.perf_counter() - t0
        except (DatasetError, storage.StorageError) as e:
            return EMPTY_IMAGE, np.zeros(0, np.int32), EMPTY_MASK, str(e), time.perf_counter() - t0
        except Exception as e:  # whatever else one file does to a reader, it fails alone
            return (EMPTY_IMAGE, np.zeros(0, np.int32), EMPTY_MASK, f"loading {image_id} failed: {type(e).__name__}: {e}",
                    time.perf_counter() - t0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded = list(self.pool.map(self._load, [str(i) for i in batch["image_id"]], batch["record"]))
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
    """Computes CAMs, refinement and pseudo masks for a batch and writes them to the output URI.

    Poison images end ``failed`` alone, and the job always ends:
    - a batch that raises is redone image by image, so only the image that raises fails, with
      its id, size and error;
    - a batch that killed its worker (out of memory, or over ``compute.memory_per_actor``) leaves
      its in-flight marker behind. Ray restarts the actor and retries the batch (at most
      ``compute.max_batch_attempts`` times); the retry sees the marker and labels image by image,
      each under its own marker, so an image whose marker survives a second death is the poison
      one: it is failed without being touched again, and the rest are labelled.
    """

    def __init__(self, config: dict[str, Any], class_names: list[str], gpus: float, job_token: str) -> None:
        self.cfg = LabelConfig.model_validate(config)
        if self.cfg.compute.torch_threads:
            torch.set_num_threads(self.cfg.compute.torch_threads)
        self.classes = class_set(class_names, self.cfg)
        self.device = device_for(gpus)
        self.pipeline = build_pipeline(self.cfg, self.classes, self.device)
        self.num_labels = self.classes.num_classes + 1
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.io = ThreadPoolExecutor(max_workers=8)
        self.inflight = outputs.InFlight(self.cfg.output, job_token, self.cfg.dataset.storage)
        self.guard = MemoryGuard.start(memory_per_actor(self.cfg))

    def _write(self, image_id: str, res: PseudoMask, size: tuple[int, int]) -> None:
        out, opts = self.cfg.output, self.cfg.dataset.storage
        if self.cfg.cache != "none":
            aux = {k: v.numpy() for k, v in res.aux.items()} if self.cfg.cache == "full" else {}
            storage.write_bytes(outputs.cams_uri(out, image_id), outputs.encode_cams(
                res.cams.numpy(), res.labels, size, res.class_scores.numpy(), aux), opts)
        storage.write_bytes(outputs.pseudo_uri(out, image_id), encode_mask_png(res.mask.numpy()), opts)
        storage.write_bytes(outputs.confidence_uri(out, image_id), outputs.encode_confidence_png(res.confidence.numpy()),
                            opts)
        # the ready-to-use mask last: a reader that finds it finds the others
        storage.write_bytes(outputs.mask_uri(out, image_id), encode_mask_png(res.mask_conf.numpy()), opts)

    def _results(self, batch: dict[str, np.ndarray], idx: list[int], errors: list[str]) -> dict[int, Any]:
        """CAM-source results for images ``idx``; a batch that raises is redone image by image."""
        if not idx:
            return {}
        try:
            res = self.pipeline([batch["image"][i] for i in idx], [list(batch["labels"][i]) for i in idx])
            return dict(zip(idx, res, strict=True))
        except Exception as e:  # a bad image must not take its batch down with it
            if len(idx) > 1:
                return {k: v for i in idx for k, v in self._results(batch, [i], errors).items()}
            i = idx[0]
            h, w = batch["image"][i].shape[:2]
            errors[i] = f"labeling {batch['image_id'][i]} ({w}x{h}) failed: {type(e).__name__}: {e}"[:2000]
            return {}

    def _rows(self, batch: dict[str, np.ndarray], idx: list[int], errors: list[str]) -> list[dict[str, Any]]:
        """Label, write and describe images ``idx`` (their manifest rows, not yet committed)."""
        ids = [str(batch["image_id"][i]) for i in idx]
        self.guard.doing = ids
        t0 = time.perf_counter()
        results = self._results(batch, [i for i in idx if not errors[i]], errors)
        per_image = (time.perf_counter() - t0) / max(1, len(results))
        t0 = time.perf_counter()
        futures = {i: self.io.submit(self._write, str(batch["image_id"][i]), r, tuple(batch["image"][i].shape[:2]))
                   for i, r in results.items()}
        for i, f in futures.items():
            try:
                f.result()
            except storage.StorageError as e:
                errors[i] = str(e)
        rows = [self._row(batch, i, results.get(i), errors[i], per_image) for i in idx]
        metrics.record_label_rows(rows, self.cfg.cam_source, (time.perf_counter() - t0) / max(1, len(futures)))
        return rows

    def _row(self, batch: dict[str, np.ndarray], i: int, r, error: str, per_image: float) -> dict[str, Any]:
        row: dict[str, Any] = {"image_id": str(batch["image_id"][i]), "error": error, "worker": self.worker,
                               "finished_at": time.time(), "seconds_load": float(batch["seconds_load"][i]),
                               "labels": [int(x) for x in batch["labels"][i]]}
        if r is None or error:
            return row | {"status": "failed"}
        h, w = batch["image"][i].shape[:2]
        gt = batch["mask"][i]
        row.update(status="done", height=h, width=w, seconds_infer=per_image,
                   fg_fraction=float((r.mask_conf > 0).logical_and(r.mask_conf < 255).float().mean()),
                   ignore_fraction=float((r.mask_conf == 255).float().mean()))
        if gt.size:
            row["cm_raw_index"], row["cm_raw_count"] = sparse_confusion(r.mask_raw, gt, self.num_labels)
            row["cm_index"], row["cm_count"] = sparse_confusion(r.mask, gt, self.num_labels)
        return row

    def _commit(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the rows' manifest part: only then are their images complete. A part that cannot be
        written fails its own images (they are relabelled by the next pass or run), nothing more."""
        try:
            outputs.write_part(self.cfg.output, rows, self.cfg.dataset.storage)
        except storage.StorageError as e:
            return [r | {"status": "failed", "error": f"manifest part not written: {e}"} for r in rows]
        return rows

    def _isolated(self, batch: dict[str, np.ndarray], errors: list[str]) -> list[dict[str, Any]]:
        """Image by image, each under its own marker: an earlier attempt of this batch died."""
        rows = []
        for i in range(len(batch["image_id"])):
            image_id = str(batch["image_id"][i])
            if self.inflight.exists([image_id]):
                h, w = batch["image"][i].shape[:2]
                errors[i] = (f"its worker died while labeling {image_id} ({w}x{h}), twice: out of memory, or over "
                             f"compute.memory_per_actor={memory_per_actor(self.cfg)} bytes; it was not tried again")
                rows += self._commit([self._row(batch, i, None, errors[i], 0.0)])
                metrics.record_label_rows(rows[-1:], self.cfg.cam_source, 0.0)
                self.inflight.remove([image_id])
                continue
            self.inflight.create([image_id])
            rows += self._commit(self._rows(batch, [i], errors))
            self.inflight.remove([image_id])
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["image_id"]]
        errors = [str(e) for e in batch["error"]]
        if self.inflight.exists(ids):
            rows = self._isolated(batch, errors)
        else:
            self.inflight.create(ids)
            rows = self._commit(self._rows(batch, list(range(len(ids))), errors))
        self.inflight.remove(ids)
        self.guard.doing = []
        return {"image_id": np.asarray(ids, dtype=object), "status": np.asarray([r["status"] for r in rows], dtype=object),
                "error": np.asarray([r["error"] for r in rows], dtype=object)}


def memory_per_actor(cfg: LabelConfig) -> int | None:
    """Bytes a labeling actor may hold: reserved from Ray's ``memory`` resource and enforced.

    auto: 2 GiB (model, runtime) + 2 KiB a pixel of the largest image allowed
    (``dataset.max_image_pixels``): room for one image at the cap on ViT-B/16, whose attention
    grows with the square of the pixel count (~6 GB at 2 MP).
    """
    m = cfg.compute.memory_per_actor
    if m == "auto":
        cap = cfg.dataset.max_image_pixels
        return None if cap is None else 2 * 1024**3 + 2048 * cap
    return m


class MemoryGuard:
    """Ends its own process when its resident memory passes a limit, as a container's OOM killer
    would, but per actor: one poison image then costs one worker, not the node (Ray's own
    memory monitor acts only when the whole node is nearly full, and may kill another task)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.doing: list[str] = []

    @classmethod
    def start(cls, limit: int | None, interval: float = 0.05) -> MemoryGuard:
        guard = cls(limit)
        if limit is not None and os.path.exists("/proc/self/statm"):
            threading.Thread(target=guard._watch, args=(interval,), name="wsss-memory-guard", daemon=True).start()
        return guard

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self, interval: float) -> None:
        while True:
            rss = self.rss()
            if self.limit is not None and rss > self.limit:
                print(f"[wsss label] worker {os.getpid()} holds {rss / 2**20:.0f} MiB, over compute.memory_per_actor="
                      f"{self.limit / 2**20:.0f} MiB, while labeling {', '.join(self.doing[:8])}; ending it",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(interval)


class LoadingLabeler(Labeler):
    """Loader and Labeler in one actor: on CPU-only clusters a separate loader pool would compete
    with the labelers for the same cores and copy every decoded image between processes."""

    def __init__(self, config: dict[str, Any], class_names: list[str], gpus: float, job_token: str,
                 reader: dict[str, Any]) -> None:
        super().__init__(config, class_names, gpus, job_token)
        self.loader = Loader(reader)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(self.loader(batch))

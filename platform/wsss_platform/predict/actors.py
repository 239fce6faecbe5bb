"""The Ray Data callable of ``wsss predict``: a trained segmenter over batches of loaded images.

Each actor loads the checkpoint once, predicts image by image (sizes differ; multi-scale + flip
when configured, bf16 on GPU), writes ``masks/<id>.png`` and ``confidence/<id>.png`` like ``wsss
label`` does, and returns one manifest row per image with its sparse confusion against the ground
truth when there is one. An image that fails (unreadable, or raising in the model) fails alone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import numpy as np
import torch

from wsss_platform import outputs, storage
from wsss_platform.checkpoint import load_network
from wsss_platform.datasets.base import encode_mask_png
from wsss_platform.label.actors import Loader, sparse_confusion
from wsss_platform.label.stages import device_for
from wsss_platform.predict.config import PredictConfig
from wsss_platform.train.evaluate import segment


class Predictor:
    def __init__(self, config: dict[str, Any], checkpoint: str, gpus: float) -> None:
        self.cfg = PredictConfig.model_validate(config)
        if self.cfg.compute.torch_threads:
            torch.set_num_threads(self.cfg.compute.torch_threads)
        self.device = device_for(gpus)
        model, self.names = load_network(checkpoint, self.cfg.dataset.storage)
        self.model = model.to(self.device)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            probs = segment(self.model, image, self.device, self.cfg.scales, self.cfg.flip).float()
        conf, pred = probs.max(0)
        return pred.cpu().numpy().astype(np.uint8), conf.cpu().numpy()

    def _one(self, image_id: str, image: np.ndarray, gt: np.ndarray, error: str) -> dict[str, Any]:
        row: dict[str, Any] = {"image_id": image_id, "status": "failed", "error": error, "worker": self.worker,
                               "finished_at": time.time()}
        if error:
            return row
        t0 = time.perf_counter()
        try:
            pred, conf = self._predict(image)
            out, opts = self.cfg.output, self.cfg.dataset.storage
            storage.write_bytes(outputs.confidence_uri(out, image_id), outputs.encode_confidence_png(conf), opts)
            storage.write_bytes(outputs.mask_uri(out, image_id), encode_mask_png(pred), opts)
        except Exception as e:  # one image that breaks the model or the store fails alone
            h, w = image.shape[:2]
            return row | {"error": f"predicting {image_id} ({w}x{h}) failed: {type(e).__name__}: {e}"[:2000]}
        row |= {"status": "done", "height": pred.shape[0], "width": pred.shape[1],
                "seconds_infer": time.perf_counter() - t0,
                "fg_fraction": float(((pred > 0) & (pred < 255)).mean())}
        if gt.size:
            row["cm_index"], row["cm_count"] = sparse_confusion(torch.from_numpy(pred).long(), gt, len(self.names))
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self._one(str(batch["image_id"][i]), batch["image"][i], batch["mask"][i], str(batch["error"][i]))
                for i in range(len(batch["image_id"]))]
        # JSON: the rows' keys differ (failed ones have no size or score), which Arrow columns do not take
        return {"row": np.asarray([json.dumps(r) for r in rows], dtype=object)}


class LoadingPredictor(Predictor):
    """Loader and Predictor in one actor, for CPU clusters (as ``label.actors.LoadingLabeler``)."""

    def __init__(self, config: dict[str, Any], checkpoint: str, gpus: float, reader: dict[str, Any]) -> None:
        super().__init__(config, checkpoint, gpus)
        self.loader = Loader(reader)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(self.loader(batch))

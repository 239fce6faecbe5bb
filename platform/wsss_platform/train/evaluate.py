"""Scoring a segmenter while it trains, and the picture of what it learned.

``validation``: the val split scored on every worker in parallel (each a slice of the ids, confusion
matrices all-reduced), single-scale while training and at the configured scales (+ flip) at the end.
``preview``: image | prediction | pseudo mask | ground truth for a few training images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from wsss_core.inference import predict_probs
from wsss_core.metrics import ConfusionMatrix
from wsss_platform.train.config import TrainConfig


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def segment(net: torch.nn.Module, image: np.ndarray, device: torch.device, scales: list[float] = (1.0,),
            flip: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] -> class probabilities [C + 1, H, W] (averaged over ``scales`` and flips)."""
    pixels = net.normalize(torch.from_numpy(np.array(image))[None].to(device))
    return predict_probs(net, pixels, list(scales), flip)[0]


@torch.no_grad()
def confusion(model: torch.nn.Module, ds, ids: list[str], num_classes: int, device: torch.device,
             scales: list[float], flip: bool) -> ConfusionMatrix:
    """This worker's slice of ``ids`` scored, then the confusion matrices summed over workers."""
    net = unwrap(model)
    net.eval()
    cm = ConfusionMatrix(num_classes)
    for image_id in my_slice(ids):
        row = ds.load(image_id)
        cm.update(segment(net, row.image, device, scales, flip).argmax(0).cpu(), row.mask)
    net.train()
    return all_reduce(cm, device)


def my_slice(ids: list[str]) -> list[str]:
    """This worker's share of ``ids`` (all of them outside distributed training)."""
    return ids[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else ids


def all_reduce(cm: ConfusionMatrix, device: torch.device) -> ConfusionMatrix:
    """The confusion matrices of every worker summed."""
    total = torch.as_tensor(cm.matrix, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return ConfusionMatrix.from_list(total.cpu().long().tolist())


def iou_metrics(cm: ConfusionMatrix, names: list[str], prefix: str = "val") -> dict[str, float]:
    """``<prefix>_miou`` and ``<prefix>_iou/<class>`` (classes never seen nor predicted left out)."""
    out = {f"{prefix}_miou": cm.miou()}
    return out | {f"{prefix}_iou/{n}": v for n, v in zip(names, cm.iou().tolist(), strict=True) if not math.isnan(v)}


def validation(cfg: TrainConfig, model, ds, config: dict[str, Any], device: torch.device,
               final: bool) -> dict[str, float]:
    """val mIoU (single-scale while training; the configured scales and flip at the end); ``ds`` the
    val split, None when there is none."""
    if ds is None:
        return {}
    scales, flip = (cfg.train.eval_scales, cfg.train.eval_flip) if final else ([1.0], False)
    cm = confusion(model, ds, config["val_ids"], config["num_classes"], device, scales, flip)
    return iou_metrics(cm, config["class_names"])


def preview(model: torch.nn.Module, rows: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]]) -> bytes:
    """PNG grid, one row per (id, image [H, W, 3], pseudo mask [H, W] or None, ground truth or None):
    image | prediction | pseudo mask | ground truth."""
    from wsss_platform.preview import colour, panels

    cells = []
    for image_id, image, pseudo, gt in rows:
        pred = segment(model, image, torch.device("cpu")).argmax(0).numpy().astype(np.uint8)
        cells.append((image_id, [("image", image, False), ("prediction", colour(pred, image), True),
                                 ("pseudo mask", colour(pseudo, image), True), ("ground truth", colour(gt, image), True)]))
    return panels(cells)

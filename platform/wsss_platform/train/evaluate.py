"""Scoring while training: a segmenter's probabilities, each worker's slice of the val ids, the
confusion matrices summed over workers, and the IoU metrics logged (``Recipe.validation`` uses them)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from wsss_core.inference import predict_probs
from wsss_core.metrics import ConfusionMatrix


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def segment(net: torch.nn.Module, image: np.ndarray, device: torch.device, scales: list[float] = (1.0,),
            flip: bool = False) -> torch.Tensor:
    """uint8 [H, W, 3] -> class probabilities [C + 1, H, W] (averaged over ``scales`` and flips)."""
    pixels = net.normalize(torch.from_numpy(np.array(image))[None].to(device))
    return predict_probs(net, pixels, list(scales), flip)[0]


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

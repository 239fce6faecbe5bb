"""Segmenter inference: single-scale, or multi-scale + flip with the softmax averaged (DeepLab's
evaluation; reference scales 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@torch.no_grad()
def predict_probs(model: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                  scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class probabilities averaged over scales (and horizontal flips).

    Args:
        model: normalised pixels [B, 3, h, w] -> logits [B, C + 1, h, w].
        pixels: normalised [B, 3, H, W].

    Returns:
        float32 [B, C + 1, H, W], summing to 1 over classes.
    """
    h, w = pixels.shape[-2:]
    total, n = None, 0
    for s in scales:
        x = pixels if s == 1 else F.interpolate(pixels, size=(max(1, round(h * s)), max(1, round(w * s))),
                                                 mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = model(x.flip(-1) if flipped else x).float()
            logits = logits.flip(-1) if flipped else logits
            probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
            total = probs if total is None else total + probs
            n += 1
    assert total is not None, "scales is empty"
    return total / n

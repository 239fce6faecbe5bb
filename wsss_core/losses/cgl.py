"""CLIP-ES's confidence-guided loss (CGL) for the final segmenter.

CGL (Lin et al., CVPR 2023, Sec. 3.4): the segmenter learns from a pseudo mask only where the
pseudo mask is confident, ``Conf = max(1 - max_k p_k, max_k p_k) >= mu`` (``wsss_core.masks.
confidence``), with cross-entropy averaged over those pixels. ``mu = 0`` is plain cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_core.masks import IGNORE


def cgl_loss(logits: torch.Tensor, mask: torch.Tensor, confidence: torch.Tensor, mu: float) -> torch.Tensor:
    """Cross-entropy over the confident, labelled pixels.

    Args:
        logits: [B, C+1, H, W] (background first).
        mask: long [B, H, W] pseudo labels, 255 = ignore.
        confidence: float [B, H, W] in [0, 1].
        mu: pixels with ``confidence < mu`` are left out.

    Returns:
        the mean cross-entropy over the pixels kept; 0 (with a zero gradient, no NaN) when none are.
    """
    target = torch.where(confidence >= mu, mask.long(), torch.full_like(mask, IGNORE, dtype=torch.long))
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    kept = (target != IGNORE).sum()
    return per_pixel.sum() / kept.clamp_min(1)

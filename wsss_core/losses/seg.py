"""ToCo's segmentation-head loss: background and foreground pixels weigh the same.

Pseudo labels from CAMs are mostly background; a plain cross-entropy would let the head learn
"background" everywhere. ToCo averages the two means instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_core.masks import IGNORE


def balanced_seg_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``0.5 · (CE over background pixels + CE over foreground pixels)``, 255 ignored.

    Args:
        logits: [B, C+1, H, W] (background first).
        mask: long [B, H, W]: 0 background, 1..C classes, 255 ignore.

    Returns:
        scalar; a side with no pixels adds 0 (no NaN).
    """
    mask = mask.long()
    ce = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE, reduction="none")
    bg, fg = (mask == 0).to(ce.dtype), ((mask != 0) & (mask != IGNORE)).to(ce.dtype)
    return 0.5 * ((ce * bg).sum() / bg.sum().clamp_min(1) + (ce * fg).sum() / fg.sum().clamp_min(1))

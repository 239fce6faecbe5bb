"""Softmax-GradCAM (CLIP-ES, Lin et al., CVPR 2023).

For image i with present classes c_1..c_K, logits over [present classes + background classes]
``Y = logit_scale * cos(img, text)``, ``s = softmax(Y)``; for each present class c:
``w_k = mean_n ds_c/dA_{n,k}``, ``CAM_c = ReLU(sum_k w_k A_k)``. The gradient of a softmax output
carries the competition of every other class, background included (plain GradCAM's ``dY_c`` does
not: :mod:`wsss_core.cams.gradcam`).
"""

from __future__ import annotations

import torch

from wsss_core.cams.clip_gradcam import clip_gradcam, pair_index, text_table
from wsss_core.models.clip import ClipViT

__all__ = ["pair_index", "softmax_gradcam", "text_table"]


def softmax_gradcam(model: ClipViT, x_last: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, labels: list[list[int]],
                    autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax-GradCAM for all present classes of a batch in one backward pass.

    Args:
        model: the CLIP ViT; x_last: tokens entering the last block [B, S, D].
        fg: foreground text features [C, E]; bg: background text features [n_bg, E].
        labels: per image its present classes (1-based), K_i each.
        autocast_dtype: run the last block in this dtype (bf16/fp16 on GPU); None for float32.

    Returns:
        cams: float32 [P, N] (P = sum K_i, ReLU'd, not normalised); scores: float32
        [B, K_max + n_bg] softmax over each image's text classes; img: long [P] image of each row.
    """
    return clip_gradcam(model, x_last, fg, bg, labels, "softmax", autocast_dtype)

"""Grad-CAM on CLIP's last block, batched over images and present classes (the mechanics shared by
:mod:`wsss_core.cams.gradcam` and :mod:`wsss_core.cams.softmax_gradcam`).

For image i with present classes c_1..c_K, logits over [present classes + background classes]
``Y = logit_scale * cos(img, text)``, ``s = softmax(Y)``; for each present class c and target
``T_c`` (``Y_c`` for GradCAM, ``s_c`` for Softmax-GradCAM): ``w_k = mean_n dT_c/dA_{n,k}``,
``CAM_c = ReLU(sum_k w_k A_k)``, A the last block's normalised input tokens.

The reference runs one backward per class per image. Here every (image, class) pair is one row:
the last block is replicated per pair (rows are independent, so one backward of the summed targets
gives each row's own gradient), which turns B·K backward passes into one.
"""

from __future__ import annotations

from typing import Literal

import torch

from wsss_core.models.clip import ClipViT


def pair_index(labels: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index [P], slot index [P]) for every present class of every image, P = sum K_i."""
    img = [i for i, ls in enumerate(labels) for _ in ls]
    slot = [j for ls in labels for j in range(len(ls))]
    return (torch.tensor(img, dtype=torch.long, device=device), torch.tensor(slot, dtype=torch.long, device=device))


def text_table(fg: torch.Tensor, bg: torch.Tensor, labels: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image text classes [present (padded to K_max), background].

    Args:
        fg: [C, E] foreground text features; bg: [n_bg, E].
        labels: per image, its K_i present classes (1-based).

    Returns:
        text: [B, K_max + n_bg, E]; valid: bool [B, K_max + n_bg] (padding slots False).
    """
    b, k_max = len(labels), max((len(ls) for ls in labels), default=0)
    e = fg.shape[1]
    text = fg.new_zeros(b, k_max + bg.shape[0], e)
    valid = torch.zeros(b, k_max + bg.shape[0], dtype=torch.bool, device=fg.device)
    for i, ls in enumerate(labels):
        if ls:
            text[i, : len(ls)] = fg[torch.tensor(ls, device=fg.device) - 1]
            valid[i, : len(ls)] = True
    text[:, k_max:] = bg
    valid[:, k_max:] = True
    return text, valid


def clip_gradcam(model: ClipViT, x_last: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, labels: list[list[int]],
                 target: Literal["softmax", "logit"], autocast_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM of ``target`` for all present classes of a batch in one backward pass.

    Args:
        model: the CLIP ViT.
        x_last: tokens entering the last block, [B, S, D] (from ``ClipViT.forward_features``).
        fg: foreground text features [C, E]; bg: background text features [n_bg, E].
        labels: per image its present classes (1-based), K_i each.
        target: ``softmax`` (s_c: Softmax-GradCAM) or ``logit`` (Y_c: plain GradCAM).
        autocast_dtype: run the last block in this dtype (bf16/fp16 on GPU); None for float32.

    Returns:
        cams: float32 [P, N], ReLU'd, not normalised; row p belongs to (image img[p], class slot
            slot[p]) in the order of :func:`pair_index`.
        scores: float32 [B, K_max + n_bg], the softmax over each image's text classes (padding 0).
        img: long [P], the image index of each row.
    """
    device = x_last.device
    img, slot = pair_index(labels, device)
    text, valid = text_table(fg, bg, labels)
    if img.numel() == 0:
        return x_last.new_zeros(0, x_last.shape[1] - 1, dtype=torch.float32), valid.float(), img
    block = model.blocks[-1]
    with torch.enable_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
        feats_b = block.ln_1(x_last)
        feats = feats_b[img].detach().requires_grad_(True)
        emb = model.last_block_embedding(feats, x_last[img])
        logits = model.logit_scale * torch.einsum("pe,pte->pt", emb, text[img])
        logits = logits.masked_fill(~valid[img], float("-inf"))
        s = logits.softmax(-1)
        t = s if target == "softmax" else logits
        (grad,) = torch.autograd.grad(t.gather(1, slot[:, None]).sum(), feats)
    weights = grad[:, 1:].float().mean(1)  # [P, D]
    cams = torch.einsum("pnd,pd->pn", feats[:, 1:].detach().float(), weights).relu_()
    counts = torch.tensor([len(ls) for ls in labels], device=device)
    first = counts.cumsum(0) - counts  # rows are grouped by image: each image's first row
    has = counts > 0
    scores = torch.zeros(len(labels), text.shape[1], device=device)
    scores[has] = s.detach().float()[first[has]]
    return cams, scores, img

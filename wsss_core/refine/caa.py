"""Class-aware attention affinity (CAA, CLIP-ES, Lin et al., CVPR 2023).

W: head-averaged self-attention among patch tokens, averaged over the last L blocks (N×N).
Sinkhorn normalisation (columns, then rows, ``rounds`` times) gives D; ``A = (D + D^T) / 2``; the
affinity is ``A^t``. For class c, the box mask B_c is the union of the bounding boxes of the
8-connected regions where ``CAM_c >= lambda * max CAM_c``, and

    M_c = (A^t ⊙ B_c) · vec(CAM_c)

with B_c laid along the columns (as in the reference code: only pixels inside the boxes
propagate), then min–max normalised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.maps import minmax_normalize, pad
from wsss_core.registry import REFINERS
from wsss_core.types import RefineSpace


def sinkhorn(attn: torch.Tensor, rounds: int = 3, eps: float = 1e-12) -> torch.Tensor:
    """Alternate column and row normalisation.

    Args:
        attn: non-negative [..., N, N].
        rounds: how many (columns, rows) passes.

    Returns:
        [..., N, N], rows summing to 1 after the last pass.
    """
    d = attn
    for _ in range(rounds):
        d = d / d.sum(-2, keepdim=True).clamp_min(eps)
        d = d / d.sum(-1, keepdim=True).clamp_min(eps)
    return d


def affinity(attn: torch.Tensor, t: int = 2, sinkhorn_rounds: int = 3) -> torch.Tensor:
    """``((D + D^T) / 2)^t`` with D = sinkhorn(attn); [..., N, N] -> [..., N, N] float32."""
    d = sinkhorn(attn.float(), sinkhorn_rounds)
    a = (d + d.transpose(-1, -2)) / 2
    return torch.linalg.matrix_power(a, t) if t != 1 else a


def connected_components(fg: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of boolean maps, by max-label propagation (vectorised).

    Args:
        fg: bool [K, h, w].

    Returns:
        int64 [K, h, w]: each foreground pixel holds the largest flat index in its component,
        background pixels hold -1.
    """
    k, h, w = fg.shape
    idx = torch.arange(h * w, device=fg.device, dtype=torch.float32).view(1, 1, h, w).expand(k, 1, h, w)
    lab = torch.where(fg[:, None], idx, torch.full_like(idx, -1.0))
    mask = fg[:, None]
    step = 0
    while True:
        new = torch.where(mask, F.max_pool2d(lab, 3, stride=1, padding=1), lab)
        step += 1
        # Convergence is checked every few steps: each check is a device sync.
        done = step >= h * w or (step % 4 == 0 and torch.equal(new, lab))
        lab = new
        if done:
            break
    return lab[:, 0].long()


def box_masks(cams: torch.Tensor, threshold: float) -> torch.Tensor:
    """Union of the bounding boxes of the 8-connected regions with ``cam >= threshold * max``.

    Args:
        cams: [K, h, w].
        threshold: lambda in [0, 1].

    Returns:
        bool [K, h, w].
    """
    k, h, w = cams.shape
    if k == 0:
        return torch.zeros_like(cams, dtype=torch.bool)
    peak = cams.flatten(1).amax(1).view(k, 1, 1)
    fg = (cams >= threshold * peak) & (peak > 0)
    labels = connected_components(fg)
    ys = torch.arange(h, device=cams.device).view(1, h, 1).expand(k, h, w)
    xs = torch.arange(w, device=cams.device).view(1, 1, w).expand(k, h, w)
    keep = labels >= 0
    comp = (torch.arange(k, device=cams.device).view(k, 1, 1) * (h * w) + labels)[keep]
    size = k * h * w
    big = torch.iinfo(torch.long).max
    ymin = torch.full((size,), big, device=cams.device).scatter_reduce(0, comp, ys[keep], "amin")
    ymax = torch.full((size,), -1, device=cams.device).scatter_reduce(0, comp, ys[keep], "amax")
    xmin = torch.full((size,), big, device=cams.device).scatter_reduce(0, comp, xs[keep], "amin")
    xmax = torch.full((size,), -1, device=cams.device).scatter_reduce(0, comp, xs[keep], "amax")
    ids = torch.unique(comp)  # M components over all K maps
    y0, y1, x0, x1 = ymin[ids], ymax[ids], xmin[ids], xmax[ids]
    inside = ((ys[0][None] >= y0.view(-1, 1, 1)) & (ys[0][None] <= y1.view(-1, 1, 1))
              & (xs[0][None] >= x0.view(-1, 1, 1)) & (xs[0][None] <= x1.view(-1, 1, 1)))  # [M, h, w]
    out = torch.zeros(k, h * w, dtype=torch.float32, device=cams.device)
    out.index_add_(0, ids // (h * w), inside.flatten(1).float())
    return out.view(k, h, w) > 0


def box_mask(cam: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`box_masks` for one map: ``cam`` [h, w] -> bool [h, w]."""
    return box_masks(cam[None], threshold)[0]


def caa_refine(cams: torch.Tensor, aff: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``M = (A^t ⊙ B) · vec(CAM)`` for a batch, without materialising A^t ⊙ B.

    Args:
        cams: [B, K, N]; aff: A^t [B, N, N]; boxes: bool [B, K, N] (B along columns).

    Returns:
        refined [B, K, N], min–max normalised per map.
    """
    # (A ⊙ 1 B^T) v == A (B ⊙ v): the column mask moves onto the vector.
    refined = torch.bmm(aff, (cams * boxes).transpose(1, 2)).transpose(1, 2)
    return minmax_normalize(refined, dims=1)


def caa(cams: torch.Tensor, attn: torch.Tensor, *, box_threshold: float = 0.4, t: int = 2,
        sinkhorn_rounds: int = 3) -> torch.Tensor:
    """Refine one image's CAMs with class-aware attention affinity.

    Args:
        cams: [K, h, w], one per present class.
        attn: [N, N] raw averaged attention among the N = h·w patch tokens.
        box_threshold: lambda of the box mask (0.4 VOC, 0.7 COCO).
        t: power of the affinity.
        sinkhorn_rounds: Sinkhorn passes.

    Returns:
        refined CAMs [K, h, w] float32, each min–max normalised.
    """
    k, h, w = cams.shape
    aff = affinity(attn[None], t, sinkhorn_rounds)
    boxes = box_masks(cams.float(), box_threshold).view(1, k, h * w)
    return caa_refine(cams.float().view(1, k, h * w), aff, boxes).view(k, h, w)


def attn_key(attn_layers: int) -> str:
    """The aux key of attention averaged over the last ``attn_layers`` blocks."""
    return f"attn/{int(attn_layers)}"


@REFINERS.register("caa")
@dataclass(frozen=True)
class CAA:
    """CAA as a refiner: batched over the images of one grid size and their present classes.

    Args (reference defaults: all 8 last blocks, box 0.4 VOC / 0.7 COCO, t 2, 3 rounds):
        attn_layers: L, the attention averaged over the last L blocks (aux ``attn/L``).
        box_threshold: lambda of the box masks.
        t: power of the affinity.
        sinkhorn_rounds: Sinkhorn passes.
    """

    attn_layers: int = 8
    box_threshold: float = 0.4
    t: int = 2
    sinkhorn_rounds: int = 3

    space: ClassVar[RefineSpace] = "cams"
    needs: ClassVar[frozenset[str]] = frozenset({"attn"})
    needs_image: ClassVar[bool] = False

    @property
    def aux_keys(self) -> frozenset[str]:
        return frozenset({attn_key(self.attn_layers)})

    def __call__(self, maps: list[torch.Tensor], aux: Sequence[Mapping[str, torch.Tensor]],
                 images: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
        """Per image CAMs [K_i, h, w] in [0, 1] and aux ``attn/L`` [N, N] -> refined [K_i, h, w]."""
        if not maps or max(m.shape[0] for m in maps) == 0:
            return maps
        key = attn_key(self.attn_layers)
        attn = torch.stack([a[key] for a in aux]).to(maps[0].device, torch.float32)
        b, (h, w) = len(maps), maps[0].shape[-2:]
        cams = pad([m.float() for m in maps]).flatten(2)  # [B, K_max, N]
        k_max = cams.shape[1]
        boxes = box_masks(cams.view(b * k_max, h, w), self.box_threshold).view(b, k_max, h * w)
        refined = caa_refine(cams, affinity(attn, self.t, self.sinkhorn_rounds), boxes).view(b, k_max, h, w)
        return [refined[i, : m.shape[0]] for i, m in enumerate(maps)]

"""Pixel-adaptive refinement (PAR; ToCo, Ru et al., CVPR 2023, after Araslanov & Roth's PAMR).

CAMs are coarse; PAR propagates them along the image: each iteration replaces a pixel's scores by
a weighted mean of its neighbours' at several dilations, the weights a softmax over the neighbours
of how alike their colours are (relative to the local colour spread) plus a small term that
prefers near neighbours. ToCo refines the CAM labels of its segmentation head with it; here it is
also a labeling-time refiner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.registry import REFINERS
from wsss_core.types import ImageRefiner

# The 8 neighbours of a pixel (row, column offsets), the same order in every dilation.
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, 8·len(dilations), H, W]: each pixel's neighbours at each dilation
    (edges replicated)."""
    h, w = x.shape[-2:]
    out = []
    for d in dilations:
        p = F.pad(x, [d] * 4, mode="replicate")
        out += [p[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w] for dy, dx in OFFSETS]
    return torch.stack(out, dim=2)


def par_affinity(image: torch.Tensor, dilations: Sequence[int], w1: float = 0.3, w2: float = 0.01) -> torch.Tensor:
    """PAR's neighbour weights.

    ``softmax_n(-mean_ch(|I_n − I| / (std_n I_n · w1))²) + w2 · softmax_n(-(dist_n / (std_n dist · w1))²)``
    with ``dist`` = d for edge neighbours and √2·d for diagonal ones (std unbiased, over the neighbours).

    Args:
        image: float [B, 3, H, W] (any per-channel affine normalisation gives the same weights).

    Returns:
        [B, 1, 8·len(dilations), H, W]; each pixel's weights sum to 1 + w2.
    """
    n = neighbours(image, dilations)
    colour = -((n - image.unsqueeze(2)).abs() / (n.std(dim=2, keepdim=True) + 1e-8) / w1).pow(2)
    colour = colour.mean(dim=1, keepdim=True).softmax(dim=2)
    dist = torch.tensor([d * (math.sqrt(2) if dy and dx else 1.0) for d in dilations for dy, dx in OFFSETS],
                        dtype=image.dtype, device=image.device)
    near = (-(dist / (dist.std() + 1e-8) / w1).pow(2)).softmax(dim=0)
    return colour + w2 * near.view(1, 1, -1, 1, 1)


def par(image: torch.Tensor, maps: torch.Tensor, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
        iterations: int = 10, w1: float = 0.3, w2: float = 0.01) -> torch.Tensor:
    """Refine ``maps`` along ``image``.

    Args:
        image: float [B, 3, H, W].
        maps: [B, K, h, w] scores (CAMs with a background channel, or probabilities); resized to
            H×W bilinearly (corners aligned) first.
        dilations, iterations: reference (1, 2, 4, 8, 12, 24) and 10.

    Returns:
        [B, K, H, W]: ``iterations`` times ``m ← Σ_n a_n · m_n``. As in the authors' code the weights
        sum to 1 + w2, so every score grows by (1 + w2)^iterations (the argmax is unaffected).
    """
    m = F.interpolate(maps.to(image.dtype), size=image.shape[-2:], mode="bilinear", align_corners=True)
    a = par_affinity(image, dilations, w1, w2)
    for _ in range(iterations):
        m = (neighbours(m, dilations) * a).sum(dim=2)
    return m


@REFINERS.register("par")
@dataclass(frozen=True)
class PAR(ImageRefiner):
    """PAR as a refiner of the scores [1 + K, H, W] (background first), image by image; the result
    is divided by (1 + w2)^iterations so that the scores keep their scale (and the confidence its
    meaning)."""

    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    iterations: int = 10
    w1: float = 0.3
    w2: float = 0.01

    what: ClassVar[str] = "PAR"

    def refine(self, image: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image)).to(probs.device).permute(2, 0, 1)[None].float()
        out = par(x, probs[None].float(), self.dilations, self.iterations, self.w1, self.w2)[0]
        return out / (1 + self.w2) ** self.iterations

"""Pixel pairs within a radius on a feature grid (PSA, Ahn & Kwak, CVPR 2018): the offsets, each
pixel's neighbours as shifted views, and AffinityNet's pair affinity ``W_ij = exp(−mean_c |f_i − f_j|)``.

Shared by AffinityNet (``models.affinitynet``), its loss's pair labels (``refine.affinity_labels``)
and the random walk (``refine.random_walk``). Letters: B images, D channels, (h, w) the grid, P pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def radius_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) ≠ (0, 0) with dy² + dx² < radius², both directions (PSA: radius 5 → 68 of them).

    Sorted, so an offset's mirror ``(−dy, −dx)`` sits at the mirrored index: ``P − 1 − i``."""
    r = radius - 1
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
            if (dy or dx) and dy * dy + dx * dx < radius * radius]


def shifted(x: torch.Tensor, offsets: list[tuple[int, int]], fill: float = 0.0) -> torch.Tensor:
    """``[..., h, w] -> [..., P, h, w]``: at (y, x) the value at (y + dy, x + dx), ``fill`` off the grid."""
    h, w = x.shape[-2:]
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    p = F.pad(x, [r] * 4, value=fill)
    return torch.stack([p[..., r + dy: r + dy + h, r + dx: r + dx + w] for dy, dx in offsets], dim=-3)


def pair_affinity(features: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """AffinityNet's ``W_ij = exp(−mean_c |f_i − f_j|)`` between each pixel and its neighbours.

    Args:
        features: [B, D, h, w].

    Returns:
        [B, P, h, w] over :func:`radius_offsets`; 0 where the neighbour is off the grid.
    """
    offsets = radius_offsets(radius)
    inside = shifted(torch.ones_like(features[:, :1]), offsets)[:, 0]  # [B, P, h, w]
    diff = (shifted(features, offsets) - features.unsqueeze(2)).abs().mean(1)  # [B, P, h, w]
    return torch.exp(-diff) * inside

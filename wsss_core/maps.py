"""Small helpers on stacks of maps: normalise, upsample, pad, and group images by size.

Letters: K maps (classes) per image, (h, w) a feature grid, (H, W) an image.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

K = TypeVar("K", bound=Hashable)


def minmax_normalize(x: torch.Tensor, dims: int = 2, eps: float = 1e-7) -> torch.Tensor:
    """Min–max normalise each map over its last ``dims`` dimensions to [0, 1]."""
    flat = x.flatten(-dims)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(x)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., h, w] -> float [..., H, W], bilinear (each map on its own)."""
    if maps.numel() == 0:
        return maps.new_zeros(*maps.shape[:-2], *size, dtype=torch.float32)
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="bilinear", align_corners=False)
    return out.view(*lead, *size)


def pad(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image [K_i, h, w] -> [B, K_max, h, w], zeros past K_i (one batched op for all images)."""
    k_max = max((m.shape[0] for m in maps), default=0)
    out = maps[0].new_zeros(len(maps), k_max, *maps[0].shape[-2:])
    for i, m in enumerate(maps):
        out[i, : m.shape[0]] = m
    return out


def group_by(keys: Iterable[K]) -> dict[K, list[int]]:
    """Indices grouped by key, in first-seen order of the keys and input order within a group."""
    out: dict[K, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        out[key].append(i)
    return dict(out)


def group_by_size(shapes: Iterable[Sequence[int]]) -> dict[tuple[int, int], list[int]]:
    """Indices grouped by the leading (H, W) of each shape: what can share one batched forward."""
    return group_by((int(s[0]), int(s[1])) for s in shapes)


def chunks(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    """``indices`` in consecutive runs of at most ``size``."""
    for start in range(0, len(indices), size):
        yield list(indices[start: start + size])


def size_batches(shapes: Iterable[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of at most ``batch_size`` images of one size."""
    for idx in group_by_size(shapes).values():
        yield from chunks(idx, batch_size)

"""Patch grids of ViTs at any input size: the positional embedding resized to the grid, the input padded
to whole patches (shared by the CLIP-ES tower and the backbones).

Letters: D width, (h, w) the grid, P prefix tokens (CLS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_pos_embed(pos: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int],
                     num_prefix: int = 1) -> torch.Tensor:
    """Positional embedding for another patch grid: prefix rows kept, the grid part bilinear.

    Args:
        pos: [P + h0·w0, D]; src_grid: (h0, w0); dst_grid: (h, w); num_prefix: P.

    Returns:
        [P + h·w, D] in ``pos``'s dtype (``pos`` itself when the grids agree).
    """
    if tuple(src_grid) == tuple(dst_grid):
        return pos
    prefix, patch = pos[:num_prefix], pos[num_prefix:]
    grid = patch.reshape(1, *src_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(dst_grid[0] * dst_grid[1], -1).to(pos.dtype)])


def pad_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad [B, 3, H, W] at the bottom and right to multiples of ``multiple``."""
    h, w = pixels.shape[-2:]
    return F.pad(pixels, (0, -w % multiple, 0, -h % multiple))

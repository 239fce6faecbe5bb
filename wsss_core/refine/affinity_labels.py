"""PSA's affinity labels (Ahn & Kwak, CVPR 2018): which pixel pairs are alike, from CAMs alone.

The background score ``(1 − max_c CAM)^α`` with a low power (reference 4) is large: where a class
still wins, the pixel is confidently that class. With a high power (reference 32) it is small: where
the background still wins, the pixel is confidently background. Everything else is ignored. Pairs of
confident pixels within a radius are then labelled: same class (background included) → 1, different
→ 0. PSA sharpens both maps with a dense CRF first (``images``, optional).
"""

from __future__ import annotations

import numpy as np
import torch

from wsss_core.masks import IGNORE
from wsss_core.pairs import radius_offsets, shifted


def confident_regions(cams: torch.Tensor, labels: torch.Tensor, alpha_low: float = 4.0, alpha_high: float = 32.0,
                      images: np.ndarray | None = None) -> torch.Tensor:
    """Per-pixel labels from CAMs: confident classes, confident background, the rest ignored.

    Args:
        cams: [B, C, h, w] in [0, 1] (all C foreground classes).
        labels: [B, C] multi-hot image-level labels; absent classes do not compete.
        alpha_low, alpha_high: the two background powers (reference 4 and 32).
        images: optional uint8 [B, h, w, 3] at the CAMs' size: a dense CRF on both score maps first.

    Returns:
        long [B, h, w]: 0 background, 1..C a class, 255 ignored.
    """
    present = cams * labels[:, :, None, None].to(cams.dtype)
    base = 1 - present.amax(1, keepdim=True)

    def winner(alpha: float) -> torch.Tensor:
        scores = torch.cat([base.pow(alpha), present], dim=1)  # [B, 1 + C, h, w]
        if images is not None:
            from wsss_core.refine.crf import dense_crf

            # absent classes stay out of the CRF's label set (PSA runs it over the present classes only)
            keep = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).bool()
            scores = torch.stack([_crf_present(dense_crf, im, s, k) for im, s, k in zip(images, scores, keep, strict=True)])
        return scores.argmax(1)

    low, high = winner(alpha_low), winner(alpha_high)
    out = torch.where(low > 0, low, torch.full_like(low, IGNORE))
    return torch.where(high == 0, torch.zeros_like(high), out)


def _crf_present(dense_crf, image: np.ndarray, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(scores)
    out[keep] = dense_crf(np.asarray(image), scores[keep]).to(scores.dtype)
    return out


def pair_labels_in_radius(region: torch.Tensor, radius: int = 5) -> dict[str, torch.Tensor]:
    """Pair labels from per-pixel labels (:func:`confident_regions`, 255 ignored) on the feature grid.

    Args:
        region: long [B, h, w].
        radius: pairs (i, j) with |i − j|² < radius² (reference 5), over
            :func:`wsss_core.pairs.radius_offsets`.

    Returns:
        bool [B, P, h, w] each, for the pair of pixel (y, x) and its neighbour at offset P:
        ``bg_pos`` (both confident background), ``fg_pos`` (both the same confident class) and
        ``neg`` (both confident, different labels); pairs in none of them are ignored.
    """
    other = shifted(region, radius_offsets(radius), fill=IGNORE)  # [B, P, h, w]
    here = region.unsqueeze(1)
    both = (here != IGNORE) & (other != IGNORE)
    same = both & (here == other)
    return {"bg_pos": same & (here == 0), "fg_pos": same & (here > 0), "neg": both & (here != other)}


def affinity_labels(cams: torch.Tensor, labels: torch.Tensor, alpha_low: float = 4.0, alpha_high: float = 32.0,
                    radius: int = 5, images: np.ndarray | None = None,
                    valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The pair labels AffinityNet learns from, on the CAMs' grid: :func:`confident_regions` (outside
    ``valid``, a crop's padding, ignored) then :func:`pair_labels_in_radius`."""
    region = confident_regions(cams, labels, alpha_low, alpha_high, images)
    if valid is not None:
        region = torch.where(valid, region, torch.full_like(region, IGNORE))
    return pair_labels_in_radius(region, radius)

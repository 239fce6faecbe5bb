"""From class scores to pseudo masks: background rules, argmax, confidence-guided ignore (CGL)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = 255


def background_score(cams: torch.Tensor, *, bg_threshold: float | None = None,
                     bg_power: float | None = None) -> torch.Tensor:
    """Background score [1, H, W]: a constant ``tau`` or ``(1 - max_k CAM)^alpha``; exactly one rule."""
    if (bg_threshold is None) == (bg_power is None):
        raise ValueError("give exactly one background rule: bg_threshold or bg_power")
    h, w = cams.shape[-2:]
    if bg_threshold is not None:
        return cams.new_full((1, h, w), float(bg_threshold))
    peak = cams.amax(0, keepdim=True) if cams.shape[0] else cams.new_zeros(1, h, w)
    return (1 - peak).clamp_min(0).pow(bg_power)


def cams_to_mask(cams: torch.Tensor, labels: Sequence[int], *, bg_threshold: float | None = None,
                 bg_power: float | None = None) -> torch.Tensor:
    """Pseudo mask: argmax over [background, present classes].

    Args:
        cams: [K, H, W] in [0, 1], one per present class.
        labels: the K class ids (1-based), in the order of ``cams``.
        bg_threshold / bg_power: the background rule (exactly one).

    Returns:
        uint8 [H, W]: 0 background, else the class id.
    """
    if cams.shape[0] != len(labels):
        raise ValueError(f"{cams.shape[0]} CAMs but {len(labels)} labels")
    scores = torch.cat([background_score(cams, bg_threshold=bg_threshold, bg_power=bg_power), cams])
    lut = torch.tensor([0, *labels], dtype=torch.uint8, device=cams.device)
    # max(0).indices: same first-maximum tie rule as argmax(0), ~10x faster over dim 0 on CPU
    return lut[scores.max(0).indices]


def confidence(scores: torch.Tensor) -> torch.Tensor:
    """``Conf = max(1 - max_k X, max_k X)``, [K, H, W] -> [H, W]."""
    peak = scores.amax(0) if scores.shape[0] else scores.new_zeros(scores.shape[-2:])
    return torch.maximum(1 - peak, peak)


def confidence_mask(scores: torch.Tensor, mask: torch.Tensor, mu: float) -> torch.Tensor:
    """Confidence-guided labels (CLIP-ES CGL): a copy of ``mask`` with 255 where ``Conf < mu``.

    Args:
        scores: [K, H, W] foreground probabilities (refined CAMs or CRF posteriors).
        mask: uint8 [H, W] pseudo mask.
        mu: confidence threshold in [0, 1].
    """
    out = mask.clone()
    out[confidence(scores) < mu] = IGNORE
    return out

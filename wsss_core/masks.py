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


def background_rule(bg_rule: str, bg_value: float) -> dict[str, float]:
    """``("threshold", 0.5)`` -> ``{"bg_threshold": 0.5}``; ``("power", 8)`` -> ``{"bg_power": 8}``."""
    if bg_rule not in ("threshold", "power"):
        raise ValueError(f"bg_rule must be threshold or power, got {bg_rule!r}")
    return {"bg_threshold": bg_value} if bg_rule == "threshold" else {"bg_power": bg_value}


def cams_to_mask(cams: torch.Tensor, labels: Sequence[int], *, bg_threshold: float | None = None,
                 bg_power: float | None = None, background: torch.Tensor | None = None) -> torch.Tensor:
    """Pseudo mask: argmax over [background, present classes].

    Args:
        cams: [K, H, W] in [0, 1], one per present class.
        labels: the K class ids (1-based), in the order of ``cams``.
        bg_threshold / bg_power: the background rule (exactly one), or
        background: precomputed background scores [1, H, W] (e.g. a CRF posterior).

    Returns:
        uint8 [H, W]: 0 background, else the class id (the first maximum on ties).
    """
    if cams.shape[0] != len(labels):
        raise ValueError(f"{cams.shape[0]} CAMs but {len(labels)} labels")
    if background is None:
        background = background_score(cams, bg_threshold=bg_threshold, bg_power=bg_power)
    elif bg_threshold is not None or bg_power is not None:
        raise ValueError("give a background rule or precomputed background scores, not both")
    scores = torch.cat([background.to(cams.dtype), cams])
    lut = torch.tensor([0, *labels], dtype=torch.uint8, device=cams.device)
    # max(0).indices: same first-maximum tie rule as argmax(0), ~10x faster over dim 0 on CPU
    return lut[scores.max(0).indices]


def confidence(scores: torch.Tensor) -> torch.Tensor:
    """``Conf = max(1 - max_k X, max_k X)``: [K, H, W] -> [H, W], or [B, K, H, W] -> [B, H, W].

    ``scores`` are foreground probabilities; with no class (K = 0) the confidence is 1.
    """
    if scores.shape[-3] == 0:
        return scores.new_ones(*scores.shape[:-3], *scores.shape[-2:])
    peak = scores.amax(-3)
    return torch.maximum(1 - peak, peak)


def confidence_mask(scores: torch.Tensor, mask: torch.Tensor, mu: float) -> torch.Tensor:
    """Confidence-guided labels (CLIP-ES CGL): a copy of ``mask`` with 255 where ``Conf < mu``.

    Args:
        scores: [K, H, W] foreground probabilities (refined CAMs or CRF posteriors).
        mask: uint8 [H, W] pseudo mask.
        mu: confidence threshold in [0, 1].
    """
    return confidence_cut(mask, confidence(scores), mu)


def confidence_cut(mask: torch.Tensor, conf: torch.Tensor, mu: float) -> torch.Tensor:
    """A copy of ``mask`` [..., H, W] with 255 where ``conf`` [..., H, W] < mu (mu = 0 keeps all)."""
    out = mask.clone()
    out[conf < mu] = IGNORE
    return out

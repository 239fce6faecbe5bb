"""Refinements of CAMs: CAA (CLIP-ES) and dense CRF."""

from wsss_core.refine.caa import (
    affinity,
    box_mask,
    box_masks,
    caa,
    connected_components,
    minmax_normalize,
    sinkhorn,
)
from wsss_core.refine.crf import CRFUnavailableError, dense_crf

__all__ = [
    "CRFUnavailableError", "affinity", "box_mask", "box_masks", "caa", "connected_components", "dense_crf",
    "minmax_normalize", "sinkhorn",
]

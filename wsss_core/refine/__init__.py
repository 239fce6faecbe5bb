"""Refinements of CAMs, each a registered refiner: CAA (CLIP-ES) and the dense CRF."""

from wsss_core.refine.caa import (
    CAA,
    affinity,
    box_mask,
    box_masks,
    caa,
    connected_components,
    sinkhorn,
)
from wsss_core.refine.crf import CRFUnavailableError, DenseCRF, dense_crf

__all__ = [
    "CAA", "CRFUnavailableError", "DenseCRF", "affinity", "box_mask", "box_masks", "caa", "connected_components",
    "dense_crf", "sinkhorn",
]

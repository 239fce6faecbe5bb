"""Refinements of CAMs, each a registered refiner: CAA (CLIP-ES), the dense CRF and PAR (ToCo)."""

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
from wsss_core.refine.par import PAR, par, par_affinity

__all__ = [
    "CAA", "PAR", "CRFUnavailableError", "DenseCRF", "affinity", "box_mask", "box_masks", "caa",
    "connected_components", "dense_crf", "par", "par_affinity", "sinkhorn",
]

"""Refinements of CAMs, each a registered refiner: CAA (CLIP-ES), the dense CRF and PAR (ToCo); PSA's
random walk along a learned affinity and the affinity labels it learns from; the vote of pseudo
masks into class-agnostic regions (SEPL)."""

from wsss_core.pairs import pair_affinity, radius_offsets
from wsss_core.refine.affinity_labels import (
    affinity_labels,
    confident_regions,
    pair_labels_in_radius,
)
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
from wsss_core.refine.random_walk import RandomWalk, dense_affinity, random_walk, random_walk_banded
from wsss_core.refine.regions import RegionMerge, region_merge

__all__ = [
    "CAA",
    "PAR",
    "CRFUnavailableError",
    "DenseCRF",
    "RandomWalk",
    "RegionMerge",
    "affinity",
    "affinity_labels",
    "box_mask",
    "box_masks",
    "caa",
    "confident_regions",
    "connected_components",
    "dense_affinity",
    "dense_crf",
    "pair_affinity",
    "pair_labels_in_radius",
    "par",
    "par_affinity",
    "radius_offsets",
    "random_walk",
    "random_walk_banded",
    "region_merge",
    "sinkhorn",
]

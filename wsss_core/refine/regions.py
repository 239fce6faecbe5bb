"""Pseudo masks voted into class-agnostic regions (SEPL, Chen et al., "Segment Anything Model (SAM)
Enhanced Pseudo Labels for Weakly Supervised Semantic Segmentation", arXiv 2305.05803; code
``cskyl/SAM_WSSS``, ``merge/``).

With the incoming pseudo mask ``M = argmax_k P_k`` (background first) and regions ``r`` (superpixels
or SAM masks; :mod:`wsss_core.regions`), region r joins present class k (k ≥ 1) when

    |r ∩ M_k| / |r| ≥ inside   (SEPL: > 0.5, the class holds most of the region), or
    |r ∩ M_k| / |M_k| ≥ cover  (SEPL: 0.85, the region holds most of the class's mask).

A region that several classes claim goes to the one with the highest mean score over it,
``S_rk = mean_{p ∈ r} P_k(p)``; a pixel in several joined regions (SAM's overlap) takes the region
with the highest ``S``; a pixel in regions that joined no class becomes background (as in SEPL,
whose output starts from background); a pixel in no region keeps its incoming label (SEPL:
"trust CAM if SAM has no prediction on that pixel"). SEPL gives a region to the first class (in
class order) that claims it; here the score decides, so the order of the classes does not matter.

The result is again a probability map [1 + K, H, W] whose argmax is the merged mask and whose
confidence ``max(1 − max_k P_k, max_k P_k)`` (CLIP-ES) at a region pixel is the region's mean
incoming confidence, so CGL still sees how sure the region was: at a pixel of class k,
``P'_k = c`` and 0 elsewhere; at a region pixel voted background, ``P'_0 = c`` and
``P'_j = 1 − c`` for the region's best foreground class j.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from wsss_core.masks import confidence
from wsss_core.regions import LAYERS_KEY, pack_layers
from wsss_core.registry import PROPOSERS, REFINERS


def region_stats(layers: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor,
                 conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per region: area [R], pixels of each class of ``mask`` [R, C'], summed scores [R, C'] and
    summed confidence [R], from ``layers`` int [L, H, W] (ids 0..R-1, -1 none), ``probs`` [C', H, W],
    ``mask`` long [H, W] (0..C'-1) and ``conf`` [H, W]; one scatter per layer, no [R, H, W] tensor."""
    c = probs.shape[0]
    r = int(layers.max()) + 1 if layers.numel() else 0
    area, conf_sum = probs.new_zeros(r), probs.new_zeros(r)
    counts, score_sum = probs.new_zeros(r * c), probs.new_zeros(r, c)
    flat_p, flat_m, flat_c = probs.flatten(1).T, mask.flatten(), conf.flatten()
    for layer in layers.flatten(1).long():
        at = layer >= 0
        ids = layer[at]
        area.index_add_(0, ids, torch.ones_like(flat_c[at]))
        conf_sum.index_add_(0, ids, flat_c[at])
        counts.index_add_(0, ids * c + flat_m[at], torch.ones_like(flat_c[at]))
        score_sum.index_add_(0, ids, flat_p[at])
    return area, counts.view(r, c), score_sum, conf_sum


def region_merge(probs: torch.Tensor, layers: torch.Tensor, inside: float = 0.5, cover: float = 0.85) -> torch.Tensor:
    """The merge rule above.

    Args:
        probs: [1 + K, H, W] scores, background first.
        layers: int [L, H, W] regions (:mod:`wsss_core.regions`), on the image's grid.
        inside, cover: the two joining thresholds.

    Returns:
        [1 + K, H, W] merged probabilities (``probs`` itself where no region lies).
    """
    if layers.numel() == 0 or int(layers.max()) < 0:
        return probs
    probs = probs.float()
    mask = probs.max(0).indices
    conf = confidence(probs[1:])
    area, counts, score_sum, conf_sum = region_stats(layers.to(probs.device), probs, mask, conf)
    area = area.clamp_min(1)
    score, mean_conf = score_sum / area[:, None], conf_sum / area
    class_area = torch.bincount(mask.flatten(), minlength=probs.shape[0]).to(probs.dtype)
    joins = (counts / area[:, None] >= inside) | (counts / class_area.clamp_min(1) >= cover)
    joins &= counts > 0
    joins[:, 0] = False  # background is what no class claims, not a class that joins
    joined = joins.any(1)
    best = torch.where(joins, score, torch.full_like(score, -torch.inf)).max(1).indices
    label = torch.where(joined, best, torch.zeros_like(best))
    layers = layers.long().to(probs.device)
    ids, valid = layers.clamp_min(0), layers >= 0
    # a joined region covering a pixel beats any that joined nothing; within each, the higher mean score
    none = torch.tensor(-torch.inf, device=probs.device)
    top_joined, at_joined = torch.where(valid & joined[ids], score.gather(1, best[:, None])[:, 0][ids], none).max(0)
    _, at_other = torch.where(valid & ~joined[ids], score[:, 0][ids], none).max(0)
    which = torch.where(top_joined > -torch.inf, at_joined, at_other)
    winner = ids.gather(0, which[None])[0]
    covered = valid.any(0)
    out = probs.clone()
    win = winner[covered]
    c, k = mean_conf[win], label[win]
    values = torch.zeros(probs.shape[0], win.numel(), dtype=probs.dtype, device=probs.device)
    values.scatter_(0, k[None], c[None])
    if probs.shape[0] > 1:  # background regions: the best foreground class at 1 − c keeps the confidence c
        fg_best = score[win, 1:].max(1).indices + 1
        bg = k == 0
        values[fg_best[bg], bg.nonzero()[:, 0]] = 1 - c[bg]
    out[:, covered] = values
    return out


@REFINERS.register("regions")
@dataclass
class RegionMerge:
    """The merge as a refiner of probabilities [1 + K, H, W], after any other (``[caa, regions]``,
    ``[caa, crf, regions]``).

    Args:
        proposer: a :class:`~wsss_core.regions.RegionProposer`, or a registered proposer's name
            (built with its defaults).
        inside, cover: the joining thresholds (SEPL: 0.5, 0.85).

    The proposals are the expensive part and depend on the image only: ``image_aux(images)`` gives
    them (``{"regions": int32 [L, H, W]}``), and a caller that has them (a sweep's cache) passes that
    aux, so that a sweep over ``inside`` / ``cover`` proposes nothing.
    """

    proposer: Any = "felzenszwalb"
    inside: float = 0.5
    cover: float = 0.85

    space: ClassVar[str] = "probs"
    needs: ClassVar[frozenset[str]] = frozenset()
    needs_image: ClassVar[bool] = True
    image_aux_inputs: ClassVar[tuple[str, ...]] = ("proposer",)  # and its settings: the proposals depend on nothing else
    image_aux_keys: ClassVar[tuple[str, ...]] = (LAYERS_KEY,)

    def __post_init__(self) -> None:
        if not (0 < self.inside <= 1 and 0 < self.cover <= 1):
            raise ValueError(f"regions: inside and cover must be in (0, 1] (got {self.inside}, {self.cover})")
        if isinstance(self.proposer, str):
            self.proposer = PROPOSERS.get(self.proposer)()

    @property
    def aux_keys(self) -> frozenset[str]:
        return frozenset()

    def image_aux(self, images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """uint8 [H, W, 3] images -> per image ``{"regions": int32 [L, H, W]}``."""
        return [{LAYERS_KEY: pack_layers(self.proposer.propose(np.asarray(im)))} for im in images]

    def __call__(self, maps: list[torch.Tensor], aux: Sequence[Mapping[str, torch.Tensor]],
                 images: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
        layers = [a.get(LAYERS_KEY) for a in aux]
        if any(v is None for v in layers):
            if images is None:
                raise ValueError("regions needs the images (or their cached regions)")
            layers = [a[LAYERS_KEY] for a in self.image_aux(images)]
        return [region_merge(p, v, self.inside, self.cover).to(p.dtype) for p, v in zip(maps, layers, strict=True)]

"""Class-agnostic region proposals, each a registered proposer (``wsss_core.registry.PROPOSERS``).

A proposer maps an image to regions that follow its edges, knowing nothing of classes:

    propose(image uint8 [H, W, 3]) -> masks bool [R, H, W]   (overlaps allowed; R may be 0)

(images are [H, W, 3] here as everywhere in the pipeline). Built in: ``felzenszwalb`` and ``slic``
superpixels from scikit-image (a partition of the image, no weights) and ``sam``, Segment Anything's
automatic mask generator (overlapping masks, trained weights). The ``regions`` refiner
(:mod:`wsss_core.refine.regions`) votes pseudo masks into them.

Regions travel (and are cached) as *layers*: ``int32 [L, H, W]``, each layer a set of disjoint
regions given by their ids (``0 .. R-1`` over all layers, ``-1`` = no region there), so a partition
is one layer and SAM's overlapping masks a few; :func:`pack_layers` and :func:`unpack_layers` convert.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from wsss_core.regions.sam import SAM
from wsss_core.regions.superpixels import SLIC, Felzenszwalb


@runtime_checkable
class RegionProposer(Protocol):
    def propose(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> bool [R, H, W]."""
        ...


LAYERS_KEY = "regions"
"""The image-aux key under which a staged refiner gives its regions as layers (:func:`pack_layers`);
a preview draws them whatever the refiner."""


def pack_layers(masks: torch.Tensor) -> torch.Tensor:
    """bool [R, H, W] -> int32 [L, H, W]: each mask, in order, goes to the first layer where it
    overlaps no mask already there (so a partition packs into one layer); its id is its index."""
    r, h, w = masks.shape
    layers: list[torch.Tensor] = []
    for i in range(r):
        m = masks[i]
        for layer in layers:
            if not (layer[m] >= 0).any():
                layer[m] = i
                break
        else:
            layers.append(torch.full((h, w), -1, dtype=torch.int32))
            layers[-1][m] = i
    return torch.stack(layers) if layers else torch.full((0, h, w), -1, dtype=torch.int32)


def unpack_layers(layers: torch.Tensor) -> torch.Tensor:
    """int32 [L, H, W] -> bool [R, H, W], R = the largest id + 1."""
    r = int(layers.max()) + 1 if layers.numel() else 0
    ids = torch.arange(r, dtype=layers.dtype).view(r, 1, 1, 1)
    return (layers[None] == ids).any(1)


__all__ = ["SAM", "SLIC", "Felzenszwalb", "RegionProposer", "pack_layers", "unpack_layers"]

"""Superpixels as region proposals: graph-based (Felzenszwalb & Huttenlocher, IJCV 2004) and SLIC
(Achanta et al., TPAMI 2012), from scikit-image. Both partition the image (every pixel in exactly one
region) and are deterministic; no weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wsss_core.registry import PROPOSERS


def _segmentation():
    # imported on first use: scikit-image costs ~1 s to import, and most pipelines never propose regions
    from skimage import segmentation

    return segmentation


def _masks(labels: np.ndarray) -> torch.Tensor:
    """A label map [H, W] -> one bool mask per distinct label [R, H, W]."""
    _, ids = np.unique(labels, return_inverse=True)
    ids = torch.from_numpy(ids.reshape(labels.shape))
    return ids[None] == torch.arange(int(ids.max()) + 1).view(-1, 1, 1)


@PROPOSERS.register("felzenszwalb")
@dataclass(frozen=True)
class Felzenszwalb:
    """Graph-based segmentation: a larger ``scale`` gives larger regions; ``sigma`` smooths the
    image first; regions under ``min_size`` pixels are merged into a neighbour."""

    scale: float = 100.0
    sigma: float = 0.8
    min_size: int = 20

    def labels(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> int [H, W] region labels."""
        return _segmentation().felzenszwalb(np.asarray(image), scale=self.scale, sigma=self.sigma,
                                            min_size=self.min_size)

    def propose(self, image: np.ndarray) -> torch.Tensor:
        return _masks(self.labels(image))


@PROPOSERS.register("slic")
@dataclass(frozen=True)
class SLIC:
    """k-means in (colour, position) space seeded on a grid of about ``n_segments`` cells;
    ``compactness`` trades colour adherence (low) for square cells (high)."""

    n_segments: int = 200
    compactness: float = 10.0
    sigma: float = 0.0

    def labels(self, image: np.ndarray) -> np.ndarray:
        return _segmentation().slic(np.asarray(image), n_segments=self.n_segments, compactness=self.compactness,
                                    sigma=self.sigma, start_label=0, channel_axis=-1)

    def propose(self, image: np.ndarray) -> torch.Tensor:
        return _masks(self.labels(image))

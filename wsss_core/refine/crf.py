"""Dense CRF (Krähenbühl & Koltun) over class probabilities, via the optional ``pydensecrf2``.

Reference settings (CLIP-ES): 10 iterations; Gaussian sxy 1, compat 3; bilateral sxy 67, srgb 3,
compat 4. Runs on the CPU, one image at a time (the library is C++).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from wsss_core.registry import REFINERS
from wsss_core.types import ImageRefiner


class CRFUnavailableError(ImportError):
    pass


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError:
        raise CRFUnavailableError(
            "dense CRF needs the optional package pydensecrf2: pip install 'wsss-platform[crf]' "
            "(or pip install pydensecrf2), or set crf off"
        ) from None
    return dcrf, unary_from_softmax


def dense_crf(image: np.ndarray, probs: torch.Tensor, iterations: int = 10, gaussian_sxy: float = 1.0,
              gaussian_compat: float = 3.0, bilateral_sxy: float = 67.0, bilateral_srgb: float = 3.0,
              bilateral_compat: float = 4.0) -> torch.Tensor:
    """Mean-field inference.

    Args:
        image: uint8 [H, W, 3].
        probs: [C', H, W] class probabilities (background first), any positive scale.

    Returns:
        float32 [C', H, W] posterior probabilities, on the device of ``probs``.
    """
    dcrf, unary_from_softmax = _densecrf()
    c, h, w = probs.shape  # (np.require copies a read-only image: the C++ side wants a writable buffer)
    p = probs.detach().float().clamp_min(1e-8)
    p = (p / p.sum(0, keepdim=True)).cpu().numpy()
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p)))
    d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    d.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.require(image, np.uint8, ['C', 'W']), compat=bilateral_compat)
    q = np.array(d.inference(iterations), dtype=np.float32).reshape(c, h, w)
    return torch.from_numpy(q).to(probs.device)


@REFINERS.register("crf")
@dataclass(frozen=True)
class DenseCRF(ImageRefiner):
    """The dense CRF as a refiner of probabilities [1 + K, H, W] (background first), image by image.

    Args: as :func:`dense_crf` (reference: 10 iterations; Gaussian sxy 1, compat 3; bilateral
    sxy 67, srgb 3, compat 4).
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    what: ClassVar[str] = "the dense CRF"

    def __post_init__(self) -> None:
        _densecrf()  # fail when the pipeline is built, not on its first image

    def refine(self, image: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
        return dense_crf(image, probs, self.iterations, self.gaussian_sxy, self.gaussian_compat,
                         self.bilateral_sxy, self.bilateral_srgb, self.bilateral_compat)

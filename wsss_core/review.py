"""How doubtful a pseudo mask is, from what labeling already wrote: the order in which people review them.

For an image with pseudo mask ``M`` [H, W] (0 background, k ≥ 1 a class) and confidence ``C`` [H, W]
in [0, 1] (CLIP-ES's ``max(1 − max_k P_k, max_k P_k)``, :func:`wsss_core.masks.confidence`), with
CGL's cut ``mu``:

    low        = |{p : C(p) < mu}| / (H W)          the share of pixels CGL would ignore
    fg_conf    = mean_{p : M(p) ≥ 1} C(p)            how sure the foreground is (1 without foreground)
    disagree   = |{p : M(p) ≠ M'(p)}| / (H W)        against a second pseudo mask M' of the image
                                                    (another refiner or CAM source), when given
    doubt      = mean(low, 1 − fg_conf[, disagree])

Each term is in [0, 1] and grows with the doubt, so their mean ranks images without weights to tune;
the terms are kept beside the score so that a reviewer can sort by any one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Doubt:
    low: float
    fg_conf: float
    disagree: float | None
    doubt: float


def doubt(mask: np.ndarray, conf: np.ndarray, mu: float, other: np.ndarray | None = None) -> Doubt:
    """The terms above for one image: ``mask`` int [H, W], ``conf`` float [H, W], ``other`` int [H, W] or None."""
    if mask.shape != conf.shape or (other is not None and other.shape != mask.shape):
        raise ValueError(f"doubt: mask {mask.shape}, confidence {conf.shape}"
                         f"{'' if other is None else f', other mask {other.shape}'} differ in size")
    low = float((conf < mu).mean())
    fg = mask >= 1
    fg_conf = float(conf[fg].mean()) if fg.any() else 1.0
    disagree = None if other is None else float((mask != other).mean())
    terms = [low, 1.0 - fg_conf, *(() if disagree is None else (disagree,))]
    return Doubt(low, fg_conf, disagree, float(np.mean(terms)))


def changed_share(before: np.ndarray, after: np.ndarray) -> float:
    """The share of pixels whose label a person changed (``before``, ``after`` int [H, W])."""
    return float((before != after).mean())

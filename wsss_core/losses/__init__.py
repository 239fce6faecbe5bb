"""Training losses: CLIP-ES's confidence-guided loss (``cgl``) and ToCo's (``token_contrast``, ``seg``)."""

from wsss_core.losses.cgl import cgl_loss
from wsss_core.losses.seg import balanced_seg_loss
from wsss_core.losses.token_contrast import (
    ctc_loss,
    pair_labels,
    ptc_loss,
    roi_crops,
    roi_map,
    token_labels_from_cam,
)

__all__ = [
    "balanced_seg_loss", "cgl_loss", "ctc_loss", "pair_labels", "ptc_loss", "roi_crops", "roi_map",
    "token_labels_from_cam",
]

"""Training losses: CLIP-ES's confidence-guided loss (``cgl``), ToCo's (``token_contrast``, ``seg``, and
the whole objective in ``toco``) and AffinityNet's (``affinity``)."""

from wsss_core.losses.affinity import affinity_loss
from wsss_core.losses.cgl import cgl_loss
from wsss_core.losses.energy import dense_energy_loss
from wsss_core.losses.seg import balanced_seg_loss
from wsss_core.losses.toco import ToCoObjective, ToCoTraining, par_seg_labels
from wsss_core.losses.token_contrast import (
    ctc_loss,
    pair_labels,
    ptc_loss,
    roi_crops,
    roi_map,
    token_labels_from_cam,
)

__all__ = [
    "ToCoObjective", "ToCoTraining", "affinity_loss", "balanced_seg_loss", "cgl_loss", "ctc_loss", "dense_energy_loss", "pair_labels", "par_seg_labels", "ptc_loss",
    "roi_crops", "roi_map", "token_labels_from_cam",
]

"""Segment Anything (Kirillov et al., ICCV 2023) as a region proposer: its automatic mask generator
prompts the model with a ``points_per_side``² grid of points, keeps masks whose predicted IoU and
stability pass the thresholds, and removes duplicates by NMS. As SEPL (Chen et al., 2023) uses it,
once per image, class-agnostic. Needs the optional ``segment-anything`` package and trained weights
(``checkpoint``: the official ``sam_vit_*.pth`` state dict); ``None`` builds random weights, which
only tests want."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsss_core.registry import PROPOSERS


class SAMUnavailableError(ImportError):
    pass


def _segment_anything():
    try:
        import segment_anything
    except ImportError:
        raise SAMUnavailableError("regions.proposer sam needs the optional package segment-anything: "
                                  "pip install 'wsss-platform[sam]' (or use felzenszwalb or slic)") from None
    return segment_anything


@PROPOSERS.register("sam")
@dataclass
class SAM:
    """SAM's automatic mask generator (reference settings: 32 points a side, predicted IoU ≥ 0.88,
    stability ≥ 0.95). ``model_type``: ``vit_b``, ``vit_l`` or ``vit_h``, as the weights are."""

    checkpoint: Mapping[str, Any] | None = field(default=None, repr=False)
    model_type: str = "vit_b"
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    device: str = "cpu"

    def __post_init__(self) -> None:
        sa = _segment_anything()
        if self.model_type not in sa.sam_model_registry:
            raise ValueError(f"regions: unknown SAM model type {self.model_type!r}; known: "
                             f"{', '.join(k for k in sa.sam_model_registry if k != 'default')}")
        sam = sa.sam_model_registry[self.model_type](checkpoint=None)
        if self.checkpoint is not None:
            sam.load_state_dict(self.checkpoint)
        self.generator = sa.SamAutomaticMaskGenerator(
            sam.to(self.device).eval(), points_per_side=self.points_per_side, pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh)

    @torch.no_grad()
    def propose(self, image: np.ndarray) -> torch.Tensor:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        found = self.generator.generate(image)
        if not found:
            return torch.zeros(0, *image.shape[:2], dtype=torch.bool)
        return torch.from_numpy(np.stack([m["segmentation"] for m in found])).bool()

"""The CLIP-ES CAM source (Lin et al., CVPR 2023): Softmax-GradCAM on CLIP with class-name and
background prompts. CAA, its refinement, is a refiner of its own (:mod:`wsss_core.refine.caa`) fed by
the attention this source provides."""

from __future__ import annotations

from typing import ClassVar, Literal

from wsss_core.cams.clip_source import ClipCamSource
from wsss_core.registry import CAM_SOURCES


@CAM_SOURCES.register("clip_es")
class ClipES(ClipCamSource):
    """Softmax-GradCAM (gradient of ``softmax(Y)_c``) over [present classes, background prompts]."""

    target: ClassVar[Literal["softmax", "logit"]] = "softmax"

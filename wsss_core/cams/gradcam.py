"""Plain GradCAM on CLIP (Selvaraju et al., ICCV 2017): the baseline of the CLIP-ES paper.

The target is the logit ``Y_c = logit_scale * cos(img, text_c)`` itself, with no softmax: the CAM
of a class ignores which other classes (and background prompts) are there, which is what
Softmax-GradCAM fixes. Registered as the ``gradcam`` CAM source; it provides CLIP attention too,
so CAA refines it as it does CLIP-ES.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from wsss_core.cams.clip_gradcam import clip_gradcam
from wsss_core.cams.clip_source import ClipCamSource
from wsss_core.models.clip import ClipViT
from wsss_core.registry import CAM_SOURCES


def gradcam(model: ClipViT, x_last: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, labels: list[list[int]],
            autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GradCAM of the logits ``Y_c`` for all present classes of a batch in one backward pass.

    Args and returns as :func:`wsss_core.cams.softmax_gradcam.softmax_gradcam`: cams float32 [P, N],
    softmax scores [B, K_max + n_bg] (for prompt sharpness), image index [P].
    """
    return clip_gradcam(model, x_last, fg, bg, labels, "logit", autocast_dtype)


@CAM_SOURCES.register("gradcam")
class ClipGradCAM(ClipCamSource):
    """GradCAM on CLIP: gradient of the logit ``Y_c``."""

    target: ClassVar[Literal["softmax", "logit"]] = "logit"

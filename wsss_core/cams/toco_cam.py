"""ToCo's CAMs (Ru et al., CVPR 2023): the classifier's weights applied to every patch token.

ToCo classifies by global max pooling of the patch tokens followed by a bias-free 1×1 conv, so the
same conv applied before the pooling scores every token for every class: that is the CAM
(``wsss_core.models.toco.class_activation``). At
inference it is taken at several scales and both flips (the larger of the two flips, the sum over
scales) and min–max normalised per class; the auxiliary classifier's CAM the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def toco_cam(cam_fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
             scales: Sequence[float] = (1.0, 0.5, 1.5), flip: bool = True,
             size: tuple[int, int] | None = None, known: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-scale (+ flip) CAMs, min–max normalised per image and class.

    Args:
        cam_fn: normalised pixels [n, 3, h, w] -> class activations [n, C, h', w'] (≥ 0, any grid).
        pixels: normalised [B, 3, H, W].
        scales: reference (1.0, 0.5, 1.5); each resized with ``int(s · H) × int(s · W)``.
        flip: also the mirrored image, combined by the element-wise max.
        size: where the scales meet (default (H, W); a labeling source uses the token grid).
        known: ``cam_fn(pixels)`` [B, C, h', w'] where the caller has it already (training: the CAM of
            the forward pass that takes the gradient); then scale 1 runs only the mirror.

    Returns:
        [B, C, *size] in [0, 1): ``(cam − min) / (max − min + 1e-5)`` of the sum over scales.
    """
    b, _, h, w = pixels.shape
    out_size = tuple(size) if size is not None else (h, w)
    total = None
    for s in scales:
        x = pixels if s == 1 else F.interpolate(pixels, size=(int(s * h), int(s * w)), mode="bilinear",
                                                align_corners=False)
        if s == 1 and known is not None:
            cam = torch.cat([known, cam_fn(x.flip(-1))]) if flip else known
        else:
            cam = cam_fn(torch.cat([x, x.flip(-1)]) if flip else x)
        cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)
        cam = torch.maximum(cam[:b], cam[b:].flip(-1)) if flip else cam
        total = cam.relu() if total is None else total + cam.relu()
    assert total is not None, "scales is empty"
    lo = total.amin(dim=(2, 3), keepdim=True)
    total = total - lo
    return total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5)

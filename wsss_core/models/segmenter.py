"""The final segmenter of every WSSS method: DeepLab-style, trained on pseudo masks.

backbone (``wsss_core.models.backbones``: timm CNN at output stride 8/16, timm ViT patch tokens, or an
open_clip visual tower) -> head (``aspp``: DeepLab v2's parallel dilated classifiers, summed;
``largefov``: DeepLab-LargeFOV's dilated 3×3 + two 1×1; ``conv``: a light 3×3 + 1×1, the usual probe
head on frozen features) -> logits upsampled to the input. With ``freeze_backbone`` only the head
learns: the backbone's features can be computed once per image and the head trained on them
(:meth:`Segmenter.decode`), the way DINOv2's segmentation probes and WeCLIP's decoder are trained.

Letters: B images, C classes (+1 background), (H, W) the input, (h, w) the feature grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.models.backbones import Backbone, create_backbone
from wsss_core.models.weights import WeightsSource

Head = Literal["aspp", "largefov", "conv"]


class ASPP(nn.Module):
    """DeepLab v2's ASPP classifier: 3×3 convs at several dilation rates, their logits summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)  # type: ignore[return-value]


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV: a dilated 3×3 conv, a 1×1 conv (ReLU, dropout each), a 1×1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512, dilation: int = 12,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout), nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ConvHead(nn.Module):
    """A 3×3 conv to ``channels`` (ReLU) and a 1×1 classifier: cheap enough to train on cached features."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


HEADS: dict[str, type[nn.Module]] = {"aspp": ASPP, "largefov": LargeFOV, "conv": ConvHead}


class Segmenter(nn.Module):
    """Backbone + head; ``forward(pixels [B, 3, H, W]) -> logits [B, C + 1, H, W]``.

    Args:
        backbone: a :class:`Backbone` (its last feature map feeds the head).
        num_classes: C + 1, background included.
        head: ``aspp``, ``largefov`` or ``conv``.
        freeze_backbone: the backbone gets no gradient and stays in eval mode (only the head learns).
    """

    def __init__(self, backbone: Backbone, num_classes: int, head: Head = "aspp", freeze_backbone: bool = False) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        self.backbone = backbone
        self.head = HEADS[head](backbone.channels[-1], num_classes)
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self.frozen = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.frozen:  # frozen features are the eval-mode ones (BatchNorm statistics, no dropout)
            self.backbone.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (or float [B, 3, H, W] in [0, 1]) -> normalised float [B, 3, H, W]."""
        x = images.permute(0, 3, 1, 2).float().div(255) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> the head's input [B, D, h, w] (what a frozen backbone caches)."""
        return self.backbone(pixels)[-1]

    def decode(self, features: torch.Tensor, pitch: int = 1) -> torch.Tensor:
        """Features [B, D, h, w] -> logits [B, C + 1, ⌈h·s/pitch⌉, ⌈w·s/pitch⌉], ``s`` the backbone's
        stride: one logit per ``pitch``-pixel cell of the area the grid covers, bilinear from the head's
        grid as in :meth:`forward` (a ViT's grid covers its input padded to whole patches)."""
        s = self.backbone.stride
        h, w = features.shape[-2:]
        return F.interpolate(self.head(features), size=(-(-h * s // pitch), -(-w * s // pitch)), mode="bilinear",
                             align_corners=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[-2:]
        logits = self.head(self.backbone(pixels)[-1])
        p = self.backbone.patch_size
        if p:  # a ViT padded its input to whole patches: the grid covers the padded image
            size = (-(-h // p) * p, -(-w // p) * p)
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[..., :h, :w]
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 1e-4) -> list[dict]:
        """Backbone at ``lr``, the (new) head at ``head_lr_mult × lr`` (DeepLab's recipe); a frozen
        backbone has no group."""
        head = [{"params": list(self.head.parameters()), "lr": lr * head_lr_mult, "weight_decay": weight_decay}]
        if self.frozen:
            return head
        return [{"params": list(self.backbone.parameters()), "lr": lr, "weight_decay": weight_decay}, *head]


def create_segmenter(backbone: str, num_classes: int, pretrained: WeightsSource = None, head: Head = "aspp",
                     output_stride: int = 16, freeze_backbone: bool = False) -> Segmenter:
    """A segmenter on ``backbone`` (a timm name, or ``open_clip:<name or config JSON>``).

    Args:
        pretrained: the backbone's weights (``none``, ``timm``, an open_clip tag, a weights file).
        output_stride: CNN backbones (8 or 16).
        freeze_backbone: train the head alone (see :class:`Segmenter`).
    """
    return Segmenter(create_backbone(backbone, pretrained, output_stride=output_stride), num_classes, head,
                     freeze_backbone)

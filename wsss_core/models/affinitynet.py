"""AffinityNet (PSA, Ahn & Kwak, CVPR 2018): features whose L1 distance is a pixel affinity.

    net = create_affinitynet("resnet50", pretrained="none")        # or a timm ViT, or open_clip:<name>
    f = net(pixels)                                               # [B, D, h, w] on the backbone's grid
    w = pair_affinity(f, radius=5)                                # [B, P, h, w]: exp(−mean_c |f_i − f_j|)

Features of several depths of the backbone (PSA: ResNet-38's last three stages) are each reduced
by a bias-free 1×1 conv + ELU (to 64, 128 and 256 channels), resized to the finest grid, concatenated
and mixed by one more 1×1 conv + ELU. The affinity itself is :func:`wsss_core.pairs.pair_affinity`.

PSA's grid is stride 8 (56² cells for a 448² crop); a ViT's is its patch (16). ``input_scale`` 2 has the
network read the image upsampled 2× (positional embedding resized), so a ViT tower's cells are 8 image
pixels: boundaries twice as fine for the walk, at the backbone's cost of 4× the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.models.backbones import create_backbone
from wsss_core.models.weights import WeightsSource
from wsss_core.pairs import pair_affinity


class AffinityNet(nn.Module):
    """Backbone maps at several depths -> affinity features [B, sum(dims), h, w].

    Args:
        backbone: a :class:`wsss_core.models.backbones.Backbone` returning one map per depth.
        dims: the reduced channels of each depth (PSA: 64, 128, 256).
        input_scale: the pixels are resized by it before the backbone (2: a ViT's grid at stride 8).
    """

    def __init__(self, backbone: nn.Module, dims: Sequence[int] = (64, 128, 256), input_scale: float = 1.0) -> None:
        super().__init__()
        if input_scale <= 0:
            raise ValueError(f"input_scale must be > 0, not {input_scale}")
        self.input_scale = float(input_scale)
        if len(dims) != len(backbone.channels):
            raise ValueError(f"dims {tuple(dims)}: one per backbone depth ({len(backbone.channels)})")
        self.backbone = backbone
        self.reduce = nn.ModuleList(nn.Conv2d(c, d, 1, bias=False) for c, d in zip(backbone.channels, dims, strict=True))
        self.mix = nn.Conv2d(sum(dims), sum(dims), 1, bias=False)
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.mix.weight, gain=4)  # the authors' init: affinities start spread out
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (or float [B, 3, H, W] in [0, 1]) -> normalised float [B, 3, H, W]."""
        x = images.permute(0, 3, 1, 2).float().div(255) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    @property
    def stride(self) -> float:
        """Image pixels per feature cell."""
        return self.backbone.stride / self.input_scale

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> features [B, D, h, w] on the finest of the backbone's grids
        (h ≈ H · input_scale / backbone stride)."""
        if self.input_scale != 1.0:
            pixels = F.interpolate(pixels, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        maps = self.backbone(pixels)
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        reduced = [F.elu(conv(m)) for conv, m in zip(self.reduce, maps, strict=True)]
        reduced = [r if r.shape[-2:] == size else F.interpolate(r, size=size, mode="bilinear", align_corners=False)
                   for r in reduced]
        return F.elu(self.mix(torch.cat(reduced, dim=1)))

    def affinity(self, pixels: torch.Tensor, radius: int = 5) -> torch.Tensor:
        """[B, P, h, w]: each pixel's affinity to its neighbours within ``radius`` on the feature grid."""
        return pair_affinity(self(pixels), radius)

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 5e-4) -> list[dict]:
        """Backbone at ``lr``; the new 1×1 convs (trained from scratch) at ``head_lr_mult × lr``."""
        heads = [*self.reduce.parameters(), *self.mix.parameters()]
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay},
                {"params": heads, "lr": lr * head_lr_mult, "weight_decay": weight_decay}]


def create_affinitynet(backbone: str, pretrained: WeightsSource = None, depths: Sequence[int] = (-3, -2, -1),
                       dims: Sequence[int] = (64, 128, 256), output_stride: int = 8,
                       input_scale: float = 1.0) -> AffinityNet:
    """AffinityNet on a timm CNN (dilated to ``output_stride``), a timm ViT or ``open_clip:<name>``
    (a CLIP visual tower; ``depths`` are then blocks), reading images resized by ``input_scale``.
    A trained one is stored and rebuilt through :mod:`wsss_core.models.networks` (kind ``affinitynet``)."""
    if len(depths) != len(dims):
        raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must pair up")
    bb = create_backbone(backbone, pretrained, output_stride=output_stride, out_indices=tuple(depths))
    if len(bb.channels) != len(depths):
        raise ValueError(f"depths {tuple(depths)}: {backbone} gives {len(bb.channels)} distinct depths of them")
    return AffinityNet(bb, dims, input_scale)

"""The ToCo network (Ru et al., CVPR 2023): a ViT that classifies, localises and segments at once.

    net = create_toco("vit_tiny_patch16_224", num_classes=20, pretrained="none")
    out = net(pixels)                          # logits, aux_logits [B, C]; seg [B, C+1, h, w]; tokens
    cam, cam_aux = net.cams(pixels)            # [B, C, h, w] each (≥ 0), for wsss_core.cams.toco_cam
    s, t = net.project(student_cls), net.project_teacher(teacher_cls)   # CTC's head and its EMA teacher

Classifier: global **max** pooling of the final patch tokens, then a bias-free 1×1 conv; the
auxiliary classifier the same on an intermediate block (``aux_layer``, reference −3), whose
less-smoothed tokens give PTC its token labels. Segmentation head: LargeFOV (dilation 5) on the final
tokens. CTC's projection head (DINO-style: MLP, L2, weight-normalised last layer) sees class
tokens; its teacher is an EMA copy of the head only (the encoder is shared, its output detached).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.models.backbones import create_backbone
from wsss_core.models.segmenter import LargeFOV
from wsss_core.models.weights import WeightsSource


def class_activation(tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``ReLU(W · t)`` per token.

    Args:
        tokens: [B, D, h, w] patch tokens on their grid.
        weight: [C, D] (or the 1×1 conv's [C, D, 1, 1]) classifier weights.

    Returns:
        [B, C, h, w].
    """
    return torch.einsum("bdhw,cd->bchw", tokens, weight.reshape(weight.shape[0], -1)).relu()


class CTCHead(nn.Module):
    """``[n, D] -> [n, out_dim]``: Linear-GELU ×(layers−1) to ``bottleneck``, L2 normalisation, and a
    bias-free linear layer whose weight norm is fixed at 1 (DINO's head)."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mlp += [nn.Linear(dims[i], dims[i + 1]), nn.GELU()]
        self.mlp = nn.Sequential(*mlp[:-1])
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight normalisation with the norm fixed at 1 (DINO's g frozen at 1) is just unit rows; written
        # out rather than through torch's weight_norm parametrisation, which a pickled model cannot hold
        self.last_v = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach().clone())

    @property
    def last_weight(self) -> torch.Tensor:
        """[out_dim, bottleneck] with unit-norm rows."""
        return F.normalize(self.last_v, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1, p=2), self.last_weight)


class ToCo(nn.Module):
    """Backbone (patch tokens of ``aux_layer`` and the last block, class token) + classifiers, LargeFOV
    segmentation head and CTC's projection head with its EMA teacher.

    Args:
        num_classes: C foreground classes (the segmentation head has C + 1 outputs).
        momentum: the teacher head's EMA momentum (reference 0.9).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, proj_dim: int = 1024, momentum: float = 0.9) -> None:
        super().__init__()
        if not getattr(backbone, "patch_size", 0):
            raise ValueError("ToCo needs a ViT backbone (patch tokens and a class token)")
        d = backbone.channels[-1]
        self.backbone, self.num_classes, self.momentum = backbone, num_classes, momentum
        self.classifier = nn.Conv2d(d, num_classes, 1, bias=False)
        self.aux_classifier = nn.Conv2d(d, num_classes, 1, bias=False)
        self.seg_head = LargeFOV(d, num_classes + 1, dilation=5)
        self.proj = CTCHead(d, proj_dim)
        self.proj_teacher = copy.deepcopy(self.proj).requires_grad_(False)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (or float [B, 3, H, W] in [0, 1]) -> normalised float [B, 3, H, W]."""
        x = images.permute(0, 3, 1, 2).float().div(255) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised pixels [B, 3, H, W] -> ``logits``, ``aux_logits`` [B, C]; ``seg`` [B, C+1, h, w];
        ``tokens``, ``aux_tokens`` [B, D, h, w] (the token grid); ``cls_token`` [B, D]."""
        (aux_tokens, tokens), cls_token = self.backbone.forward_with_cls(pixels)
        return {
            "logits": self.classifier(F.adaptive_max_pool2d(tokens, 1)).flatten(1),
            "aux_logits": self.aux_classifier(F.adaptive_max_pool2d(aux_tokens, 1)).flatten(1),
            "seg": self.seg_head(tokens), "tokens": tokens, "aux_tokens": aux_tokens, "cls_token": cls_token,
        }

    def cams(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final and the auxiliary CAM [B, C, h, w] (ReLU of the classifiers on every token)."""
        (aux_tokens, tokens), _ = self.backbone.forward_with_cls(pixels)
        return self.cams_of(tokens, aux_tokens)

    def cams_of(self, tokens: torch.Tensor, aux_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`cams` from the tokens [B, D, h, w] of a forward pass already run (``forward``'s
        ``tokens`` and ``aux_tokens``)."""
        return class_activation(tokens, self.classifier.weight), class_activation(aux_tokens, self.aux_classifier.weight)

    def class_tokens(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops [n, 3, h, w] -> their class tokens [n, D] (CTC's views and local crops)."""
        return self.backbone.forward_with_cls(crops)[1]

    def project(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(cls_tokens)

    @torch.no_grad()
    def project_teacher(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj_teacher(cls_tokens.detach())

    @torch.no_grad()
    def update_teacher(self) -> None:
        """``teacher ← m · teacher + (1 − m) · student`` over the projection head's parameters."""
        for t, s in zip(self.proj_teacher.parameters(), self.proj.parameters(), strict=True):
            t.mul_(self.momentum).add_(s.detach(), alpha=1 - self.momentum)

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 0.01) -> list[dict]:
        """Backbone at ``lr``; classifiers, projection and segmentation heads at ``head_lr_mult × lr``."""
        heads = [*self.classifier.parameters(), *self.aux_classifier.parameters(), *self.seg_head.parameters(),
                 *(p for p in self.proj.parameters() if p.requires_grad)]
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay},
                {"params": heads, "lr": lr * head_lr_mult, "weight_decay": weight_decay}]


def create_toco(backbone: str, num_classes: int, pretrained: WeightsSource = None, aux_layer: int = -3,
                proj_dim: int = 1024, momentum: float = 0.9) -> ToCo:
    """ToCo on a timm ViT name or ``open_clip:<name or config JSON>`` (its visual tower); a trained one
    is stored and rebuilt through :mod:`wsss_core.models.networks` (kind ``toco``)."""
    bb = create_backbone(backbone, pretrained, out_indices=(aux_layer, -1))
    if bb.patch_size and (len(set(bb.indices)) != 2 or bb.indices[0] > bb.indices[1]):
        raise ValueError(f"aux_layer={aux_layer}: the auxiliary classifier needs a block before the last "
                         f"(reference -3)")
    return ToCo(bb, num_classes, proj_dim, momentum)

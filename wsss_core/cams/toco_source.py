"""A trained ToCo network as a CAM source: its classifier's CAMs (``toco``) or its segmentation
head's probabilities (``toco_seg``), with its backbone's attention for CAA.

    source = create_cam_source("toco", checkpoint=state, classes=classes)
    outputs = source(images, labels, aux=["attn/8"])

Each image is resized to the nearest multiple of the patch size (as the CLIP sources do), so the
maps lie on the token grid that the attention (``attn/L``: patch-to-patch, averaged over heads and
the last L blocks) describes; the pipeline upsamples them to the image.

Letters: B images, C classes of the network, K_i present classes of image i, (h, w) the grid.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.cams.clip_source import DTYPES, Precision, attn_layers_of
from wsss_core.cams.toco_cam import toco_cam
from wsss_core.classes import ClassSet
from wsss_core.maps import size_batches
from wsss_core.models.networks import network_from_state
from wsss_core.registry import CAM_SOURCES
from wsss_core.types import CamOutput


class ToCoSource:
    """Base of the ToCo sources; a subclass gives ``maps`` (one per class, on the grid).

    Args:
        checkpoint: a ToCo checkpoint's contents (``toco`` spec + ``model`` weights).
        classes: the dataset's classes; they must be the network's, in its order.
        device: where the network runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast).
        batch_size: images per forward within a size group.
        scales: the CAM's scales (reference 1.0, 0.5, 1.5; each also mirrored).
    """

    provides: ClassVar[frozenset[str]] = frozenset({"attn"})

    def __init__(self, checkpoint: Mapping[str, Any], classes: ClassSet, device: torch.device | str = "cpu",
                 precision: Precision = "fp32", batch_size: int = 8,
                 scales: Sequence[float] = (1.0, 0.5, 1.5)) -> None:
        net, names = network_from_state(checkpoint, "toco")
        if list(names[1:]) != list(classes.names):
            raise ValueError(f"the ToCo checkpoint was trained on classes {names[1:]}, the dataset has "
                             f"{list(classes.names)}: label a dataset with the checkpoint's classes, in its order")
        self._setup(net.to(device), precision, batch_size, scales)

    @classmethod
    def from_network(cls, net: torch.nn.Module, classes: ClassSet | None = None, precision: Precision = "fp32",
                     batch_size: int = 8, scales: Sequence[float] = (1.0, 0.5, 1.5)) -> ToCoSource:
        """The source on a network in hand (validation while training), on the network's device."""
        self = cls.__new__(cls)
        self._setup(net, precision, batch_size, scales)
        return self

    def _setup(self, net: torch.nn.Module, precision: Precision, batch_size: int, scales: Sequence[float]) -> None:
        self.net, self.batch_size, self.scales = net, batch_size, tuple(scales)
        self.device = next(net.parameters()).device
        self.autocast = DTYPES[precision]
        self.patch = net.backbone.patch_size

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised [B, 3, h·p, w·p] (bicubic to the nearest patch multiple)."""
        x = images.to(self.device).permute(0, 3, 1, 2).float().div(255)
        grid = [max(1, int(s / self.patch + 0.5)) * self.patch for s in x.shape[-2:]]
        if list(x.shape[-2:]) != grid:
            x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.net.mean) / self.net.std

    def maps(self, pixels: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels, bool [B, C] present classes -> [B, C, h, w] per-class maps in [0, 1] and the
        classifier's logits [B, C] (from a forward pass the maps already ran, where they run one)."""
        raise NotImplementedError

    @torch.no_grad()
    def batch(self, images: torch.Tensor, labels: Sequence[Sequence[int]], aux: Collection[str]) -> list[CamOutput]:
        pixels = self.pixels(images)
        present = torch.zeros(len(labels), self.net.num_classes, dtype=torch.bool, device=self.device)
        for i, ls in enumerate(labels):
            present[i, [c - 1 for c in ls]] = True
        keys = attn_layers_of(aux)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            maps, logits = self.maps(pixels, present)
            maps, scores = maps.float(), logits.float().sigmoid()
            attn = self.net.backbone.attention(pixels, sorted(set(keys.values()))) if keys else {}
        out = []
        for i, ls in enumerate(labels):
            idx = torch.tensor([c - 1 for c in ls], dtype=torch.long, device=maps.device)
            out.append(CamOutput(list(ls), maps[i, idx], scores[i, idx], {k: attn[n][i] for k, n in keys.items()}))
        return out

    def __call__(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]],
                 aux: Collection[str] = ()) -> list[CamOutput]:
        """One :class:`CamOutput` per image (maps of its present classes, sigmoid class scores, aux)."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label lists")
        labels = [sorted(int(c) for c in ls) for ls in labels]
        out: list[CamOutput | None] = [None] * len(images)
        for chunk in size_batches([np.shape(im) for im in images], self.batch_size):
            batch = torch.stack([torch.as_tensor(np.array(images[i])) for i in chunk])
            for i, res in zip(chunk, self.batch(batch, [labels[i] for i in chunk], aux), strict=True):
                out[i] = res
        return out  # type: ignore[return-value]


@CAM_SOURCES.register("toco")
class ToCoCams(ToCoSource):
    """The final classifier's CAM, multi-scale + flip, min–max per class (``toco_cam``)."""

    def maps(self, pixels: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = (pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch)
        out = self.net(pixels)  # the class scores, and the CAM's unflipped scale 1 from the same pass
        cam = toco_cam(lambda p: self.net.cams(p)[0], pixels, self.scales, flip=True, size=grid,
                       known=self.net.cams_of(out["tokens"], out["aux_tokens"])[0])
        return cam, out["logits"]


@CAM_SOURCES.register("toco_seg")
class ToCoSegmentation(ToCoSource):
    """The segmentation head's softmax over the background and the present classes at scale 1,
    averaged with the mirror: a class's map is its probability, so the background rule at 0.5 keeps
    a pixel for a class that wins at least half of it."""

    def maps(self, pixels: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = pixels.shape[0]
        out = self.net(torch.cat([pixels, pixels.flip(-1)]))
        seg = out["seg"].float()
        seg = (seg[:b] + seg[b:].flip(-1)) / 2
        keep = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)[:, :, None, None]
        return seg.masked_fill(~keep, float("-inf")).softmax(1)[:, 1:], out["logits"][:b]

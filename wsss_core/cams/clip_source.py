"""CLIP CAM sources in two stages: the prompt-independent backbone, then a last-block Grad-CAM.

``features`` runs every block but the last once (and averages the attention that refiners ask
for as ``attn/L``); ``cams_from_features`` runs the last block's Grad-CAM for the prompts. A sweep
caches the first and reruns only the second when the prompts change. Images of any size: they
are grouped by size and batched within a group.

Letters: B images, S = 1 + N tokens, N = h·w patches, D width, K_i present classes of image i.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np
import torch

from wsss_core.cams.clip_gradcam import clip_gradcam
from wsss_core.maps import chunks, group_by_size, minmax_normalize
from wsss_core.models.clip import ClipViT
from wsss_core.prompts import PromptSet, TextFeatureCache
from wsss_core.types import CamOutput, aux_kind

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def attn_layers_of(aux: Collection[str]) -> dict[str, int]:
    """``{"attn/8": 8, ...}`` for the attention keys among ``aux`` (a bare ``attn`` means all blocks)."""
    out = {}
    for key in aux:
        if aux_kind(key) == "attn":
            _, _, n = key.partition("/")
            out[key] = int(n) if n else 10**6
    return out


class ClipCamSource:
    """Base of the CLIP CAM sources; a subclass names its Grad-CAM ``target``.

    Args:
        clip: the CLIP ViT (on its device).
        prompts: the prompt set (foreground in label order, then background).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; half precision wants a GPU).
        batch_size: images per forward within a size group.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"attn"})
    feature_inputs: ClassVar[tuple[str, ...]] = ("clip", "precision")
    target: ClassVar[Literal["softmax", "logit"]]

    def __init__(self, clip: ClipViT, prompts: PromptSet, precision: Precision = "fp32", batch_size: int = 32) -> None:
        self.model, self.prompts, self.batch_size = clip, prompts, batch_size
        self.autocast = DTYPES[precision]
        self.device = next(clip.parameters()).device
        self._text = TextFeatureCache()

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._text.get(self.model, self.prompts)

    def features(self, images: torch.Tensor, aux: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """The prompt-independent backbone for images of one size.

        Args:
            images: uint8 [B, H, W, 3] on any device.
            aux: attention keys ``attn/L`` to average (L clamped to the depth).

        Returns:
            ``x_last`` [B, S, D] (tokens entering the last block), ``grid`` long [B, 2] (h, w),
            and each requested ``attn/L`` float32 [B, N, N].
        """
        wanted = attn_layers_of(aux)
        pixels = self.model.preprocess(images.to(self.device, non_blocking=True))
        dtype = self.autocast or torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast is not None):
            x_last, attn, grid = self.model.forward_features_multi(pixels, sorted(set(wanted.values())))
        depth = self.model.depth
        out = {"x_last": x_last, "grid": torch.tensor([grid] * len(images), dtype=torch.long)}
        for key, n in wanted.items():
            out[key] = attn[max(1, min(n, depth))].float()
        return out

    def cams_from_features(self, features: Mapping[str, torch.Tensor],
                           labels: Sequence[Sequence[int]]) -> list[CamOutput]:
        """Grad-CAMs of the present classes from :meth:`features` of images of one size.

        Returns:
            per image: CAMs [K_i, h, w] min–max normalised, softmax scores [K_i], the aux tensors.
        """
        labels = [sorted(int(c) for c in ls) for ls in labels]
        grid = tuple(int(g) for g in features["grid"][0])
        fg, bg = self.text_features()
        flat, scores, _ = clip_gradcam(self.model, features["x_last"].to(self.device), fg, bg, labels, self.target,
                                       self.autocast)
        cams = minmax_normalize(flat, dims=1).view(-1, *grid).split([len(ls) for ls in labels])
        aux_keys = [k for k in features if aux_kind(k) in self.provides]
        return [CamOutput(ls, cams[i], scores[i, : len(ls)], {k: features[k][i] for k in aux_keys})
                for i, ls in enumerate(labels)]

    def __call__(self, images: Sequence[np.ndarray | torch.Tensor], labels: Sequence[Sequence[int]],
                 aux: Collection[str] = ()) -> list[CamOutput]:
        """CAMs for a batch of images of any sizes.

        Args:
            images: uint8 [H_i, W_i, 3] each; labels: per image its present classes (1-based;
                an empty list gives no CAM); aux: keys to provide (``attn/L``).

        Returns:
            one :class:`CamOutput` per image, in input order.
        """
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label lists")
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"image {i} has shape {tuple(im.shape)}; expected [H, W, 3] uint8")
        out: list[CamOutput | None] = [None] * len(images)
        for idx in group_by_size(im.shape for im in images).values():
            for chunk in chunks(idx, self.batch_size):
                # a copy: inputs may be read-only numpy arrays
                batch = torch.stack([torch.as_tensor(np.array(images[i])) for i in chunk])
                for i, res in zip(chunk, self.cams_from_features(self.features(batch, aux), [labels[i] for i in chunk]),
                                  strict=True):
                    out[i] = res
        return out  # type: ignore[return-value]

"""CLIP-ES end to end for a batch: images + labels -> CAMs, CAA-refined CAMs, pseudo masks.

This is the call the labeling actors make. Images are grouped by size; within a group one
forward gives the last block's input and the CAA attention, one backward gives Softmax-GradCAMs
of every present class, and refinement runs batched. :func:`refine_from_cache` repeats only the
refinement and masking from cached CAMs and attention, so a sweep over refinement settings never
reruns the backbone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.cams.softmax_gradcam import softmax_gradcam
from wsss_core.masks import background_score, cams_to_mask, confidence_mask
from wsss_core.models.clip import ClipViT
from wsss_core.prompts import PromptSet, TextFeatureCache
from wsss_core.refine.caa import affinity, box_masks, caa_refine, minmax_normalize
from wsss_core.refine.crf import dense_crf

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class CAAParams:
    """CAA settings (reference defaults: all 8 last blocks, box 0.4 VOC / 0.7 COCO, t 2, 3 rounds)."""

    enabled: bool = True
    attn_layers: int = 8
    box_threshold: float = 0.4
    t: int = 2
    sinkhorn_rounds: int = 3


@dataclass(frozen=True)
class MaskParams:
    """Pseudo-mask settings: background rule and value, CGL confidence mu, optional dense CRF."""

    bg_rule: Literal["threshold", "power"] = "threshold"
    bg_value: float = 0.5
    mu: float = 0.95
    crf: bool = False
    crf_iterations: int = 10

    def rule(self) -> dict[str, float]:
        return {"bg_threshold": self.bg_value} if self.bg_rule == "threshold" else {"bg_power": self.bg_value}


@dataclass
class ImageResult:
    """One image's outputs (CPU tensors).

    Attributes:
        labels: the K present classes (1-based).
        cams: raw Softmax-GradCAMs [K, h, w] float32 in [0, 1].
        attn: averaged attention among patches [N, N] (the refinement cache).
        refined: CAA-refined CAMs [K, h, w] in [0, 1] (equal to ``cams`` when CAA is off).
        scores: upsampled class scores [K, H, W] (refined CAMs, or CRF posteriors).
        mask_raw: uint8 [H, W] from the raw CAMs.
        mask: uint8 [H, W] from the refined scores.
        mask_conf: uint8 [H, W], ``mask`` with 255 where Conf < mu.
        class_scores: softmax scores of the present classes [K] (for sharpness).
    """

    labels: list[int]
    cams: torch.Tensor
    attn: torch.Tensor
    refined: torch.Tensor
    scores: torch.Tensor
    mask_raw: torch.Tensor
    mask: torch.Tensor
    mask_conf: torch.Tensor
    class_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., h, w] -> [..., H, W], bilinear."""
    if maps.numel() == 0:
        return maps.new_zeros(*maps.shape[:-2], *size)
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="bilinear", align_corners=False)
    return out.view(*lead, *size)


def _pad(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per image [K_i, h, w] -> [B, K_max, h, w] (zeros past K_i)."""
    k_max = max(m.shape[0] for m in maps)
    out = maps[0].new_zeros(len(maps), k_max, *maps[0].shape[-2:])
    for i, m in enumerate(maps):
        out[i, : m.shape[0]] = m
    return out


def _masks(image: np.ndarray | None, labels: list[int], raw_hr: torch.Tensor, scores: torch.Tensor,
           params: MaskParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, mask_raw, mask, mask_conf) for one image from upsampled maps [K, H, W]."""
    rule = params.rule()
    mask_raw = cams_to_mask(raw_hr, labels, **rule)
    if params.crf:  # results_for_group has checked that the image is there
        bg = background_score(scores, **rule)
        q = dense_crf(image, torch.cat([bg, scores]), iterations=params.crf_iterations)
        lut = torch.tensor([0, *labels], dtype=torch.uint8, device=q.device)
        mask = lut[q.max(0).indices]
        scores = q[1:]
    else:
        mask = cams_to_mask(scores, labels, **rule)
    return scores, mask_raw, mask, confidence_mask(scores, mask, params.mu)


def refine_group(cams: list[torch.Tensor], attn: torch.Tensor, params: CAAParams) -> list[torch.Tensor]:
    """CAA for images of one grid size.

    Args:
        cams: per image [K_i, h, w] in [0, 1]; attn: [B, N, N].

    Returns:
        per image refined [K_i, h, w].
    """
    if not params.enabled:
        return cams
    b = len(cams)
    h, w = cams[0].shape[-2:] if cams else (0, 0)
    k_max = max((c.shape[0] for c in cams), default=0)
    if k_max == 0:
        return cams
    padded = attn.new_zeros(b, k_max, h * w, dtype=torch.float32)
    for i, c in enumerate(cams):
        padded[i, : c.shape[0]] = c.flatten(1)
    boxes = box_masks(padded.view(b * k_max, h, w), params.box_threshold).view(b, k_max, h * w)
    refined = caa_refine(padded, affinity(attn, params.t, params.sinkhorn_rounds), boxes).view(b, k_max, h, w)
    return [refined[i, : c.shape[0]] for i, c in enumerate(cams)]


def results_for_group(cams: list[torch.Tensor], attn: torch.Tensor, labels: list[list[int]], size: tuple[int, int],
                      caa_params: CAAParams, mask_params: MaskParams, images: Sequence[np.ndarray] | None = None,
                      class_scores: Sequence[torch.Tensor] | None = None) -> list[ImageResult]:
    """Refinement and pseudo masks for images of one size (no backbone).

    Args:
        cams: per image [K_i, h, w] in [0, 1]; attn: [B, N, N]; labels: per image its K_i classes.
        size: the images' (H, W); images: uint8 [H, W, 3] each, needed only for the CRF.
        class_scores: per image [K_i], carried into the results.

    Returns:
        one :class:`ImageResult` per image, tensors on the CPU.
    """
    if mask_params.crf and images is None:
        raise ValueError("the dense CRF needs the images")
    refined = refine_group(cams, attn, caa_params)
    raw_hr, ref_hr = _upsample(_pad(cams), size), _upsample(_pad(refined), size)
    out = []
    for j, ls in enumerate(labels):
        k = len(ls)
        image = np.asarray(images[j]) if mask_params.crf and images is not None else None
        scores, mask_raw, mask, mask_conf = _masks(image, ls, raw_hr[j, :k], ref_hr[j, :k], mask_params)
        cs = class_scores[j].cpu() if class_scores is not None else torch.zeros(k)
        out.append(ImageResult(list(ls), cams[j].cpu(), attn[j].cpu(), refined[j].cpu(), scores.cpu(),
                               mask_raw.cpu(), mask.cpu(), mask_conf.cpu(), cs))
    return out


def refine_from_cache(cams: torch.Tensor, attn: torch.Tensor, labels: list[int], size: tuple[int, int],
                      caa_params: CAAParams, mask_params: MaskParams, image: np.ndarray | None = None,
                      class_scores: torch.Tensor | None = None) -> ImageResult:
    """Refinement and masks from one image's cached CAMs [K, h, w] and attention [N, N]: no backbone."""
    return results_for_group([cams.float()], attn.float()[None], [list(labels)], size, caa_params, mask_params,
                             None if image is None else [image],
                             None if class_scores is None else [class_scores])[0]


class ClipES:
    """CLIP-ES as a batch callable.

    Args:
        model: the CLIP ViT (on its device).
        prompts: the prompt set (foreground in label order, then background).
        caa: CAA settings; masks: mask settings.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; half precision wants a GPU).
        batch_size: images per forward within a size group.
    """

    def __init__(self, model: ClipViT, prompts: PromptSet, caa: CAAParams = CAAParams(),
                 masks: MaskParams = MaskParams(), precision: Precision = "fp32", batch_size: int = 32) -> None:
        self.model, self.prompts, self.caa, self.masks = model, prompts, caa, masks
        self.autocast = _DTYPES[precision]
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self._text = TextFeatureCache()

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._text.get(self.model, self.prompts)

    def features(self, images: torch.Tensor, attn_layers: Sequence[int] | None = None
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor], tuple[int, int]]:
        """The prompt-independent part of the backbone for images of one size.

        Args:
            images: uint8 [B, H, W, 3] on any device.
            attn_layers: the L values to average attention over (default: this CAA's L).

        Returns:
            x_last: tokens entering the last block [B, S, D]; {L: attention [B, N, N] float32};
            grid (h, w).
        """
        pixels = self.model.preprocess(images.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            x_last, attn, grid = self.model.forward_features_multi(pixels, attn_layers or [self.caa.attn_layers])
        return x_last, {n: a.float() for n, a in attn.items()}, grid

    def cams_from_features(self, x_last: torch.Tensor, grid: tuple[int, int], labels: list[list[int]]
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Softmax-GradCAMs from the tokens entering the last block (what depends on the prompts).

        Args:
            x_last: [B, S, D] for images of one size; grid: (h, w); labels: per image its classes.

        Returns:
            cams: per image [K_i, h, w] min–max normalised; class_scores: per image [K_i].
        """
        fg, bg = self.text_features()
        flat, scores, _ = softmax_gradcam(self.model, x_last.to(self.device), fg, bg, labels, self.autocast)
        flat = minmax_normalize(flat, dims=1).view(-1, *grid)
        counts = [len(ls) for ls in labels]
        return list(flat.split(counts)), [scores[i, : counts[i]] for i in range(len(labels))]

    def backbone(self, images: torch.Tensor, labels: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """CAMs and attention for images of one size.

        Args:
            images: uint8 [B, H, W, 3] on any device.
            labels: per image its present classes.

        Returns:
            cams: per image [K_i, h, w] min–max normalised; attn: [B, N, N] float32;
            class_scores: per image [K_i] softmax scores of its present classes.
        """
        x_last, attn, grid = self.features(images)
        cams, scores = self.cams_from_features(x_last, grid, labels)
        return cams, next(iter(attn.values())), scores

    def __call__(self, images: Sequence[np.ndarray | torch.Tensor], labels: Sequence[Sequence[int]]) -> list[ImageResult]:
        """Run CLIP-ES on a batch of images of any sizes.

        Args:
            images: uint8 [H_i, W_i, 3] each.
            labels: per image its present classes (1-based); an empty list gives an all-background mask.

        Returns:
            one :class:`ImageResult` per image, in input order, tensors on the CPU.
        """
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label lists")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"image {i} has shape {tuple(im.shape)}; expected [H, W, 3] uint8")
            groups[(int(im.shape[0]), int(im.shape[1]))].append(i)
        out: list[ImageResult | None] = [None] * len(images)
        for size, idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start: start + self.batch_size]
                batch = torch.from_numpy(np.stack([np.asarray(images[i]) for i in chunk]))  # a copy: inputs may be read-only
                chunk_labels = [sorted(int(c) for c in labels[i]) for i in chunk]
                cams, attn, cls_scores = self.backbone(batch, chunk_labels)
                group = results_for_group(cams, attn, chunk_labels, size, self.caa, self.masks,
                                          [np.asarray(images[i]) for i in chunk] if self.masks.crf else None,
                                          cls_scores)
                for i, res in zip(chunk, group, strict=True):
                    out[i] = res
        return out  # type: ignore[return-value]

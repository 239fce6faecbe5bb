"""Any CAM source × any refiners -> pseudo masks and their confidence (the generic labeling stage).

Per image: the source's CAMs [K, h, w] -> ``cams`` refiners (batched over the images of one grid)
-> bilinear upsampling to the image -> the background rule gives probabilities [1 + K, H, W]
(background first) -> ``probs`` refiners -> argmax = pseudo mask; ``Conf = max(1 - max_k p_k,
max_k p_k)`` over the foreground probabilities, and 255 where ``Conf < mu`` (CLIP-ES's CGL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from wsss_core.maps import group_by, pad, upsample
from wsss_core.masks import (
    background_rule,
    background_score,
    cams_to_mask,
    confidence,
    confidence_cut,
)
from wsss_core.types import CamOutput, CamSource, PseudoMask, Refiner


class PseudoMasker:
    """Refinement and masks from CAM-source outputs; runs no backbone.

    Args:
        refiners: in order; ``cams`` refiners must precede ``probs`` ones.
        bg_rule: ``threshold`` (a constant background score ``bg_value``) or ``power``
            (``(1 - max_k CAM)^bg_value``).
        mu: the confidence below which a pixel is ignored (255) in ``mask_conf``.
    """

    def __init__(self, refiners: Sequence[Refiner] = (), *, bg_rule: str = "threshold", bg_value: float = 0.5,
                 mu: float = 0.95) -> None:
        self.cam_refiners = [r for r in refiners if r.space == "cams"]
        self.prob_refiners = [r for r in refiners if r.space == "probs"]
        if list(refiners) != self.cam_refiners + self.prob_refiners:
            raise ValueError("refiners on CAMs must come before refiners on probabilities")
        self.rule = background_rule(bg_rule, bg_value)
        self.mu = mu

    @property
    def aux_keys(self) -> frozenset[str]:
        """What the refiners read from the source's aux."""
        return frozenset().union(*(r.aux_keys for r in self.cam_refiners + self.prob_refiners))

    @property
    def needs_image(self) -> bool:
        return any(r.needs_image for r in self.cam_refiners + self.prob_refiners)

    def __call__(self, outputs: Sequence[CamOutput], sizes: Sequence[tuple[int, int]],
                 images: Sequence[np.ndarray] | None = None) -> list[PseudoMask]:
        """One :class:`PseudoMask` per output (CPU tensors), in input order.

        Args:
            outputs: the source's per-image outputs; sizes: each image's (H, W);
            images: uint8 [H, W, 3] each, needed when a refiner reads pixels.
        """
        if self.needs_image and images is None:
            raise ValueError("a refiner here reads the images; pass them")
        out: list[PseudoMask | None] = [None] * len(outputs)
        keys = ((tuple(int(v) for v in size), tuple(o.cams.shape[-2:])) for size, o in zip(sizes, outputs, strict=True))
        for (size, _), idx in group_by(keys).items():
            group_images = [np.asarray(images[i]) for i in idx] if images is not None and self.needs_image else None
            for i, res in zip(idx, self.group([outputs[i] for i in idx], size, group_images), strict=True):
                out[i] = res
        return out  # type: ignore[return-value]

    def group(self, outputs: Sequence[CamOutput], size: tuple[int, int],
              images: Sequence[np.ndarray] | None = None) -> list[PseudoMask]:
        """:meth:`__call__` for images of one size whose CAMs share one grid."""
        cams = [o.cams.float() for o in outputs]
        aux = [o.aux for o in outputs]
        refined = cams
        for r in self.cam_refiners:
            refined = r(refined, aux, images)
        raw_hr, ref_hr = upsample(pad(cams), size), upsample(pad(refined), size)
        ks = [len(o.labels) for o in outputs]
        probs = [torch.cat([background_score(ref_hr[j, :k], **self.rule), ref_hr[j, :k]]) for j, k in enumerate(ks)]
        for r in self.prob_refiners:
            probs = r(probs, aux, images)
        results = []
        for j, o in enumerate(outputs):
            fg = probs[j][1:]
            mask = cams_to_mask(fg, o.labels, background=probs[j][:1])
            conf = confidence(fg)
            results.append(PseudoMask(
                list(o.labels), o.cams.cpu(), o.scores.cpu(), {k: v.cpu() for k, v in o.aux.items()}, refined[j].cpu(),
                fg.cpu(), conf.cpu(), cams_to_mask(raw_hr[j, : ks[j]], o.labels, **self.rule).cpu(), mask.cpu(),
                confidence_cut(mask, conf, self.mu).cpu()))
        return results


def kept_as(output: CamOutput, dtype: torch.dtype) -> CamOutput:
    """``output`` with its CAMs and aux rounded to ``dtype`` (and back to their own dtype)."""
    return CamOutput(output.labels, output.cams.to(dtype).to(output.cams.dtype), output.scores,
                     {k: v.to(dtype).to(v.dtype) for k, v in output.aux.items()})


class LabelingPipeline:
    """A CAM source and a :class:`PseudoMasker` as one batch callable: images + labels -> masks.

    Args:
        kept_dtype: the dtype the CAMs and aux are kept in afterwards (e.g. float16 in a cache), or
            None. The masks are then refined from those rounded values, so refining the kept CAMs
            again gives back the same masks: a refiner such as CAA can turn a last-bit difference
            in nearly flat CAMs into a different box.
    """

    def __init__(self, source: CamSource, masker: PseudoMasker, kept_dtype: torch.dtype | None = None) -> None:
        self.source, self.masker, self.kept_dtype = source, masker, kept_dtype

    def __call__(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]]) -> list[PseudoMask]:
        """Images uint8 [H_i, W_i, 3] and their present classes (1-based) -> one PseudoMask each."""
        outputs = self.source(images, labels, aux=self.masker.aux_keys)
        if self.kept_dtype is not None:
            outputs = [kept_as(o, self.kept_dtype) for o in outputs]
        return self.masker(outputs, [tuple(im.shape[:2]) for im in images], images if self.masker.needs_image else None)

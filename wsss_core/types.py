"""The contracts every method meets through: a CAM source, refiners, and what flows between them.

    images + present labels --CamSource--> CamOutput per image (CAMs [K, h, w], class scores, aux)
        --Refiner(s) on "cams" (grid CAMs) --> upsample --background rule--> probabilities
        [1 + K, H, W] --Refiner(s) on "probs"--> pseudo mask + confidence   (wsss_core.pipeline)

``aux`` carries what refiners need besides CAMs (CLIP attention, a learned affinity, ...). Its keys
are ``kind`` or ``kind/setting`` (``attn/8``: attention averaged over the last 8 blocks); a source
declares the kinds it can provide, a refiner the kinds it needs, so an impossible pairing is refused
from the names alone, before any model is built (:func:`wsss_core.registry.check_pipeline`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch

RefineSpace = Literal["cams", "probs"]


def aux_kind(key: str) -> str:
    """``attn/8`` -> ``attn``."""
    return key.split("/", 1)[0]


@dataclass
class CamOutput:
    """One image's CAMs, as a CAM source gives them (CPU or device tensors).

    Attributes:
        labels: the K present classes (1-based), in the order of ``cams``.
        cams: [K, h, w] float32 in [0, 1] on the source's feature grid.
        scores: [K] the source's class scores for the present classes (e.g. CLIP softmax).
        aux: what refiners need, by key (``attn/8``: [N, N] with N = h·w).
    """

    labels: list[int]
    cams: torch.Tensor
    scores: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class CamSource(Protocol):
    """Images + present labels -> one :class:`CamOutput` per image.

    ``provides``: the aux kinds it can compute on request (``aux`` names concrete keys).
    """

    provides: ClassVar[frozenset[str]]

    def __call__(self, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]],
                 aux: Collection[str] = ()) -> list[CamOutput]: ...


@runtime_checkable
class StagedCamSource(CamSource, Protocol):
    """A CAM source in two stages, so that a sweep can cache the expensive, setting-independent one.

    ``features`` depends only on the factory arguments named in ``feature_inputs`` (e.g. the model
    and precision, not the prompts); ``cams_from_features`` does the rest. Features are a mapping
    of tensors with the batch first, so they can be sliced per image, cached and stacked again.
    """

    feature_inputs: ClassVar[tuple[str, ...]]

    def features(self, images: torch.Tensor, aux: Collection[str] = ()) -> dict[str, torch.Tensor]:
        """uint8 [B, H, W, 3] images of one size -> {name: [B, ...]} (aux keys among them)."""
        ...

    def cams_from_features(self, features: Mapping[str, torch.Tensor],
                           labels: Sequence[Sequence[int]]) -> list[CamOutput]: ...


def is_staged(source: object) -> bool:
    """Whether a CAM source (class or instance) works in two stages (:class:`StagedCamSource`)."""
    return callable(getattr(source, "features", None)) and callable(getattr(source, "cams_from_features", None)) \
        and isinstance(getattr(source, "feature_inputs", None), tuple)


@runtime_checkable
class Refiner(Protocol):
    """Refines the maps of images of one size, batched.

    ``space``: ``cams`` refiners take and give CAMs [K, h, w] in [0, 1] on the feature grid (before
    the background rule); ``probs`` refiners take and give probabilities [1 + K, H, W] at image
    size, background first (after it). ``needs``: the aux kinds it reads; ``aux_keys``: the
    concrete keys (with this refiner's settings); ``needs_image``: whether it reads the pixels.
    """

    space: ClassVar[RefineSpace]
    needs: ClassVar[frozenset[str]]
    needs_image: ClassVar[bool]

    @property
    def aux_keys(self) -> frozenset[str]: ...

    def __call__(self, maps: list[torch.Tensor], aux: Sequence[Mapping[str, torch.Tensor]],
                 images: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]: ...


@runtime_checkable
class StagedRefiner(Refiner, Protocol):
    """A refiner that runs a network of its own on the images (PSA's random walk: AffinityNet's
    affinity), in a stage apart so that a sweep can cache it: ``image_aux`` gives per image the aux
    that ``__call__`` then reads (and computes itself when absent). ``image_aux_inputs`` names the
    settings that shape it (e.g. the checkpoint and the radius, not β or t); ``image_aux_keys`` the
    keys it gives (a preview draws ``regions``)."""

    image_aux_inputs: ClassVar[tuple[str, ...]]
    image_aux_keys: ClassVar[tuple[str, ...]]

    def image_aux(self, images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """uint8 [H, W, 3] images of one size -> per image {key: tensor}."""
        ...


def is_staged_refiner(refiner: object) -> bool:
    return callable(getattr(refiner, "image_aux", None)) and isinstance(getattr(refiner, "image_aux_inputs", None), tuple)


class ImageRefiner:
    """Base of the ``probs`` refiners that read each image's pixels and no aux (the dense CRF, PAR):
    a subclass gives ``what`` (for errors) and ``refine(image uint8 [H, W, 3], probs [1 + K, H, W])``."""

    space: ClassVar[RefineSpace] = "probs"
    needs: ClassVar[frozenset[str]] = frozenset()
    needs_image: ClassVar[bool] = True
    what: ClassVar[str]

    @property
    def aux_keys(self) -> frozenset[str]:
        return frozenset()

    def refine(self, image: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, maps: list[torch.Tensor], aux: Sequence[Mapping[str, torch.Tensor]],
                 images: Sequence[np.ndarray] | None = None) -> list[torch.Tensor]:
        if images is None:
            raise ValueError(f"{self.what} needs the images")
        return [self.refine(np.asarray(im), p) for im, p in zip(images, maps, strict=True)]


@dataclass
class PseudoMask:
    """One image through a source and refiners (CPU tensors).

    Attributes:
        labels: the K present classes (1-based).
        cams: the source's CAMs [K, h, w] in [0, 1].
        class_scores: the source's scores of the present classes [K].
        aux: the source's aux tensors (what the refiners read).
        refined: CAMs after the ``cams`` refiners [K, h, w] (``cams`` when there are none).
        scores: foreground probabilities [K, H, W] after every refiner (``probs`` ones included).
        confidence: ``max(1 - max_k scores, max_k scores)`` float32 [H, W].
        mask_raw: uint8 [H, W] from the raw CAMs.
        mask: uint8 [H, W] from the refined probabilities.
        mask_conf: uint8 [H, W], ``mask`` with 255 where confidence < mu.
    """

    labels: list[int]
    cams: torch.Tensor
    class_scores: torch.Tensor
    aux: dict[str, torch.Tensor]
    refined: torch.Tensor
    scores: torch.Tensor
    confidence: torch.Tensor
    mask_raw: torch.Tensor
    mask: torch.Tensor
    mask_conf: torch.Tensor

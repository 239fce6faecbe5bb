"""The labeling job's typed config. Field names match the sweep's search-space keys.

``cam_source`` and ``refine`` name entries of the core's registries; a refiner's settings are the
section of the same name (``caa``, ``crf``, ``par``), passed to its factory as keyword arguments, so the
defaults here are the core's (a test checks that they agree).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from wsss_core.refine import (  # the refiners' defaults are the sections'
    CAA,
    PAR,
    DenseCRF,
    RandomWalk,
    RegionMerge,
)
from wsss_core.regions import SAM, SLIC, Felzenszwalb
from wsss_core.registry import CAM_SOURCES, PROPOSERS, REFINERS, check_pipeline
from wsss_platform.config import Section
from wsss_platform.datasets.base import DatasetConfig


class ModelConfig(Section):
    name: str = "ViT-B-16"
    """open_clip model name, a path to an open_clip model-config JSON, or a config packaged with
    wsss_core (``tiny``: a small ViT for tests, with pretrained: none)."""
    pretrained: str = "openai"
    """open_clip pretrained tag, a weights file (local path or s3:// URI), or ``none`` (random weights)."""
    checkpoint: str | None = None
    """A trained network, for the CAM sources that take one (``toco``, ``toco_seg``): the output of
    ``wsss train toco`` (its latest checkpoint) or one checkpoint folder, local or s3://."""


class TextConfig(Section):
    template: str = "a clean origami {}."
    fuse_synonyms: bool = True
    use_background: bool = True
    background: list[str] | None = None
    """Background prompts; None uses the class set's own (VOC 25, COCO 23, none for other datasets)."""
    synonyms: dict[str, str] = Field(default_factory=dict)
    """Class name -> text for the template's slot, on top of the built-in VOC/COCO synonyms."""

    @field_validator("template")
    @classmethod
    def _one_slot(cls, v: str) -> str:
        if v.count("{}") != 1:
            raise ValueError(f"must hold exactly one '{{}}' slot for the class name, got {v!r}")
        return v


class CAAConfig(Section):
    """Settings of the ``caa`` refiner (``wsss_core.refine.caa.CAA``)."""

    attn_layers: int = Field(CAA.attn_layers, ge=1, le=64)
    box_threshold: float = Field(CAA.box_threshold, ge=0.0, le=1.0)
    t: int = Field(CAA.t, ge=1, le=8)
    sinkhorn_rounds: int = Field(CAA.sinkhorn_rounds, ge=0, le=50)


class MaskConfig(Section):
    bg_rule: Literal["threshold", "power"] = "threshold"
    bg_value: float = Field(0.5, gt=0.0, le=64.0)
    """tau for ``threshold`` (in (0, 1]), alpha for ``power``."""
    mu: float = Field(0.95, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _tau_range(self) -> MaskConfig:
        if self.bg_rule == "threshold" and self.bg_value > 1.0:
            raise ValueError(f"bg_value: a background threshold must be in (0, 1], got {self.bg_value}")
        return self


class CRFConfig(Section):
    """Settings of the ``crf`` refiner (``wsss_core.refine.crf.DenseCRF``; CLIP-ES's reference values)."""

    iterations: int = Field(DenseCRF.iterations, ge=1, le=100)
    gaussian_sxy: float = Field(DenseCRF.gaussian_sxy, gt=0)
    gaussian_compat: float = Field(DenseCRF.gaussian_compat, ge=0)
    bilateral_sxy: float = Field(DenseCRF.bilateral_sxy, gt=0)
    bilateral_srgb: float = Field(DenseCRF.bilateral_srgb, gt=0)
    bilateral_compat: float = Field(DenseCRF.bilateral_compat, ge=0)


class PARConfig(Section):
    """Settings of the ``par`` refiner (``wsss_core.refine.par.PAR``; ToCo's reference values)."""

    dilations: tuple[Annotated[int, Field(ge=1)], ...] = Field(PAR.dilations, min_length=1)
    iterations: int = Field(PAR.iterations, ge=1, le=100)
    w1: float = Field(PAR.w1, gt=0)
    w2: float = Field(PAR.w2, ge=0)


class RandomWalkConfig(Section):
    """Settings of the ``random_walk`` refiner (``wsss_core.refine.random_walk.RandomWalk``; PSA's
    reference values); ``checkpoint`` is the trained AffinityNet."""

    checkpoint: str = ""
    """The output of ``wsss train affinity`` (its latest checkpoint) or one checkpoint folder, local or s3://."""
    beta: float = Field(RandomWalk.beta, gt=0)
    t: int = Field(RandomWalk.t, ge=0)
    alpha: float | None = Field(RandomWalk.alpha, gt=0)
    """The walked background ``(1 − max CAM)^alpha``; null walks the mask rule's background."""
    radius: int = Field(RandomWalk.radius, ge=2, le=16)
    form: Literal["auto", "banded", "dense"] = RandomWalk.form
    """banded: O(N·r²) memory, t steps; dense: [N, N] matrices, log t products; auto: dense up to 4096 grid cells."""


class FelzenszwalbConfig(Section):
    """``regions.proposer: felzenszwalb`` (``wsss_core.regions.Felzenszwalb``, scikit-image)."""

    scale: float = Field(Felzenszwalb.scale, gt=0)
    """Larger: fewer, larger regions."""
    sigma: float = Field(Felzenszwalb.sigma, ge=0)
    min_size: int = Field(Felzenszwalb.min_size, ge=1)


class SLICConfig(Section):
    """``regions.proposer: slic`` (``wsss_core.regions.SLIC``, scikit-image)."""

    n_segments: int = Field(SLIC.n_segments, ge=2)
    compactness: float = Field(SLIC.compactness, gt=0)
    sigma: float = Field(SLIC.sigma, ge=0)


class SAMConfig(Section):
    """``regions.proposer: sam`` (``wsss_core.regions.SAM``: Segment Anything's automatic mask
    generator; the optional ``segment-anything`` package)."""

    checkpoint: str = ""
    """The SAM weights (the official ``sam_vit_b_01ec64.pth`` etc.), a local path or s3:// URI;
    ``none``: random weights (tests only)."""
    model_type: Literal["vit_b", "vit_l", "vit_h"] = SAM.model_type
    points_per_side: int = Field(SAM.points_per_side, ge=1, le=128)
    pred_iou_thresh: float = Field(SAM.pred_iou_thresh, ge=0, le=1)
    stability_score_thresh: float = Field(SAM.stability_score_thresh, ge=0, le=1)


class RegionsConfig(Section):
    """Settings of the ``regions`` refiner (``wsss_core.refine.regions.RegionMerge``: SEPL's vote of
    the pseudo mask into class-agnostic regions), and of the proposer it uses (its own section)."""

    proposer: str = "felzenszwalb"
    """A registered region proposer (``wsss_core.registry.PROPOSERS``): felzenszwalb, slic or sam."""
    inside: float = Field(RegionMerge.inside, gt=0, le=1)
    """A region joins a class holding at least this share of it (SEPL: 0.5) ..."""
    cover: float = Field(RegionMerge.cover, gt=0, le=1)
    """... or holding at least this share of the class's mask (SEPL: 0.85)."""
    felzenszwalb: FelzenszwalbConfig = FelzenszwalbConfig()
    slic: SLICConfig = SLICConfig()
    sam: SAMConfig = SAMConfig()

    @field_validator("proposer")
    @classmethod
    def _known_proposer(cls, v: str) -> str:
        return PROPOSERS.known(v)


class ComputeConfig(Section):
    batch_size: int = Field(16, ge=1, le=1024)
    """Images per actor call (and per forward pass within a size group)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    min_actors: int = Field(1, ge=1)
    max_actors: int | None = Field(None, ge=1)
    """None: one actor per GPU when the cluster has GPUs, else 1."""
    gpus_per_actor: float | Literal["auto"] = "auto"
    """auto: 1 when the cluster has GPUs, else 0 (CPU actors)."""
    cpus_per_actor: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1)
    """CPU threads for torch in each labeling actor; None keeps Ray's choice (= cpus_per_actor)."""
    loader_actors: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Actors that read and decode images. 0: each labeler loads its own batches (on a few threads).
    auto: 2 when the labelers use GPUs, 0 when they run on CPUs (separate loaders would only compete
    with them for the same cores)."""
    loader_batch_size: int = Field(8, ge=1)
    memory_per_actor: Annotated[int, Field(ge=256 * 1024**2)] | Literal["auto"] | None = "auto"
    """Bytes of host memory per labeling actor: reserved from Ray's ``memory`` resource, and a
    limit the actor enforces on itself (over it, it ends, and the image that did it fails alone).
    auto: 2 GiB + 2 KiB per pixel of ``dataset.max_image_pixels``; None: neither."""
    max_batch_attempts: int = Field(4, ge=2, le=20)
    """Attempts of a batch whose worker died (Ray's task retries + 1). The second attempt isolates
    the image that killed it; each further one isolates one more poison image of the batch."""


class TrackingConfig(Section):
    enabled: bool = True
    experiment: str = "wsss-label"
    run_name: str | None = None
    preview_images: int = Field(6, ge=0, le=64)


# Keys of earlier versions: a config holding one fails with what to write instead.
REPLACED = {
    ("caa", "enabled"): "caa.enabled: replaced by the refine list: CAA runs when refine names it "
                        "(refine: [caa, crf], [caa], [crf] or [])",
    ("mask", "crf"): "mask.crf: replaced by the refine list: refine: [caa, crf] (CAA, then the dense CRF) or "
                     "[caa] (no CRF)",
    ("mask", "crf_iterations"): "mask.crf_iterations: moved to crf.iterations",
}


def _replaced_keys(data: Any) -> None:
    if not isinstance(data, dict):
        return
    found = [msg for (section, key), msg in REPLACED.items() if isinstance(data.get(section), dict) and key in data[section]]
    if isinstance(data.get("refine"), str):
        found.append(f"refine: a list of refiner names now, e.g. refine: [caa, crf] or [caa] (got {data['refine']!r}; "
                     "the dense CRF, mask.crf before, is the refiner crf)")
    if found:
        raise ValueError("; ".join(found))


class LabelConfig(Section):
    dataset: DatasetConfig = DatasetConfig()
    output: str = "label-output"
    cam_source: str = "clip_es"
    """A registered CAM source (``wsss_core.registry.CAM_SOURCES``), e.g. clip_es."""
    refine: list[str] = Field(default_factory=lambda: ["caa", "crf"])
    """Refiners in order (``wsss_core.registry.REFINERS``); [] for none. CAM refiners (caa) come
    before probability refiners (crf)."""
    model: ModelConfig = ModelConfig()
    text: TextConfig = TextConfig()
    caa: CAAConfig = CAAConfig()
    crf: CRFConfig = CRFConfig()
    par: PARConfig = PARConfig()
    random_walk: RandomWalkConfig = RandomWalkConfig()
    regions: RegionsConfig = RegionsConfig()
    mask: MaskConfig = MaskConfig()
    cache: Literal["none", "cams", "full"] = "cams"
    """What ``cams/<id>.npz`` keeps: nothing; the CAMs (float16) and class scores; or also what the
    refiners read (CLIP attention: N×N an image, ~36× the masks), for refinement-only reruns."""
    compute: ComputeConfig = ComputeConfig()
    tracking: TrackingConfig = TrackingConfig()
    overwrite: bool = False
    max_failed_fraction: float = Field(0.0, ge=0.0, le=1.0)
    ray_address: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_replaced_keys(cls, data: Any) -> Any:
        _replaced_keys(data)
        return data

    @field_validator("cam_source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        return CAM_SOURCES.known(v)

    @field_validator("refine")
    @classmethod
    def _known_refiners(cls, v: list[str]) -> list[str]:
        if unknown := [r for r in v if r not in REFINERS]:
            raise ValueError(f"unknown refiner(s) {unknown}; known: {', '.join(REFINERS.names())}")
        return v

    @model_validator(mode="after")
    def _pairing(self) -> LabelConfig:
        try:
            check_pipeline(self.cam_source, self.refine)
        except ValueError as e:
            raise ValueError(f"cam_source={self.cam_source} with refine={self.refine}: {e}") from None
        return self

"""Build the pipeline's stages from the config: class set + prompts, the CAM source, refinement.

A CAM source is a name in ``CAM_SOURCES`` whose builder returns a batch callable
``(images, labels) -> list[ImageResult]``; CLIP-ES is the first, ToCo and PSA plug in beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from wsss_core.classes import VOC, ClassSet
from wsss_core.clip_es import CAAParams, ClipES, MaskParams
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.prompts import build_prompts
from wsss_core.registry import Registry
from wsss_platform import storage
from wsss_platform.label.config import LabelConfig
from wsss_platform.storage import StorageOptions

CAM_SOURCES = Registry("CAM source")


def class_set(names: list[str], cfg: LabelConfig) -> ClassSet:
    """The dataset's classes with built-in synonyms/background (VOC/COCO) plus the config's."""
    from wsss_core.classes import COCO

    base = next((c for c in (VOC, COCO) if set(names) <= set(c.names)), None)
    synonyms = {**(base.synonyms if base else {}), **cfg.text.synonyms}
    background = tuple(cfg.text.background) if cfg.text.background is not None else (base.background if base else ())
    return ClassSet(tuple(names), {k: v for k, v in synonyms.items() if k in names}, background)


def resolve_weights(pretrained: str, options: StorageOptions | None = None) -> str | bytes | None:
    """An open_clip tag stays a tag; an ``s3://`` URI is read into bytes; a local path stays a path."""
    if pretrained.lower() in ("", "none"):
        return None
    if "://" in pretrained:
        return storage.read_bytes(pretrained, options)
    return pretrained


def _looks_like_file(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".bin", ".safetensors", ".pth", ".json"))


def check_model_paths(cfg: LabelConfig) -> None:
    """Fail on the driver, before any actor starts, when a local model file is missing."""
    from wsss_platform.config import ConfigError

    for key, value in (("model.name", cfg.model.name), ("model.pretrained", cfg.model.pretrained)):
        if "://" not in value and _looks_like_file(value) and not os.path.isfile(value):
            raise ConfigError(f"{key}: file not found: {value} (relative paths are relative to {os.getcwd()})")


def device_for(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def caa_params(cfg: LabelConfig) -> CAAParams:
    c = cfg.caa
    return CAAParams(cfg.refine == "caa" and c.enabled, c.attn_layers, c.box_threshold, c.t, c.sinkhorn_rounds)


def mask_params(cfg: LabelConfig) -> MaskParams:
    m = cfg.mask
    return MaskParams(m.bg_rule, m.bg_value, m.mu, m.crf, m.crf_iterations)


def load_clip(cfg: LabelConfig, device: torch.device) -> ClipViT:
    model, tokenizer = create_clip(cfg.model.name, resolve_weights(cfg.model.pretrained, cfg.dataset.storage))
    return ClipViT(model, tokenizer).to(device)


def clip_es_with(vit: ClipViT, cfg: LabelConfig, classes: ClassSet) -> ClipES:
    """CLIP-ES around an already loaded model (prompts, CAA and mask settings from ``cfg``)."""
    precision = cfg.compute.precision
    if precision == "auto":
        precision = "bf16" if next(vit.parameters()).device.type == "cuda" else "fp32"
    prompts = build_prompts(classes, cfg.text.template, cfg.text.fuse_synonyms, cfg.text.use_background)
    return ClipES(vit, prompts, caa_params(cfg), mask_params(cfg), precision, cfg.compute.batch_size)


@CAM_SOURCES.register("clip_es")
def build_clip_es(cfg: LabelConfig, classes: ClassSet, device: torch.device) -> Callable[..., Any]:
    return clip_es_with(load_clip(cfg, device), cfg, classes)


def build_cam_source(cfg: LabelConfig, classes: ClassSet, device: torch.device) -> Callable[..., Any]:
    return CAM_SOURCES.get(cfg.cam_source)(cfg, classes, device)

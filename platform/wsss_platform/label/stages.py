"""Build the core's pipeline from a labeling config: class set + prompts, the CAM source, refiners.

The platform names no method. A CAM source's factory (a class in ``wsss_core``'s registry) is
called with the keyword arguments its signature asks for, each supplied by an entry of ``INPUTS``
(``clip``: the loaded CLIP model, ``prompts``, ``precision``, ``batch_size``, ``checkpoint``: a
trained network's checkpoint contents, ``classes``, ``device``); a refiner's
factory gets the config section of its own name (``caa`` -> ``cfg.caa``; a ``checkpoint`` URI there
loaded, the ``device`` added: ``REFINER_INPUTS``); the mask section goes
to the ``PseudoMasker``. What shapes a source's CAMs (for cache keys) is the settings of the
inputs it takes.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from wsss_core.classes import COCO, VOC, ClassSet
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.models.weights import looks_like_path
from wsss_core.pipeline import LabelingPipeline, PseudoMasker
from wsss_core.prompts import build_prompts
from wsss_core.registry import (
    CAM_SOURCES,
    PROPOSERS,
    REFINERS,
    create_cam_source,
    create_proposer,
    create_refiner,
)
from wsss_platform import outputs, storage
from wsss_platform.checkpoint import load_state, resolve, resolve_weights
from wsss_platform.config import ConfigError
from wsss_platform.label.config import LabelConfig
from wsss_platform.storage import StorageOptions


def class_set(names: list[str], cfg: LabelConfig) -> ClassSet:
    """The dataset's classes with built-in synonyms/background (VOC/COCO) plus the config's."""
    base = next((c for c in (VOC, COCO) if set(names) <= set(c.names)), None)
    synonyms = {**(base.synonyms if base else {}), **cfg.text.synonyms}
    background = tuple(cfg.text.background) if cfg.text.background is not None else (base.background if base else ())
    return ClassSet(tuple(names), {k: v for k, v in synonyms.items() if k in names}, background)


def check_model_paths(cfg: LabelConfig) -> None:
    """Fail on the driver, before any actor starts, when a local model file is missing."""
    for key, value in (("model.name", cfg.model.name), ("model.pretrained", cfg.model.pretrained)):
        if "://" not in value and looks_like_path(value) and not os.path.isfile(value):
            raise ConfigError(f"{key}: file not found: {value} (relative paths are relative to {os.getcwd()})")


def device_for(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=2)
def _clip(name: str, pretrained: str, storage_json: str, device: str) -> ClipViT:
    # Cached per process: sweep trials reuse their actor, and a prompt change must not reload the model.
    model, tokenizer = create_clip(name, resolve_weights(pretrained, StorageOptions.model_validate_json(storage_json)))
    return ClipViT(model, tokenizer).to(device)


def load_clip(cfg: LabelConfig, device: torch.device) -> ClipViT:
    return _clip(cfg.model.name, cfg.model.pretrained, cfg.dataset.storage.model_dump_json(), str(device))


def precision(cfg: LabelConfig, device: torch.device) -> str:
    p = cfg.compute.precision
    return ("bf16" if device.type == "cuda" else "fp32") if p == "auto" else p


@functools.lru_cache(maxsize=2)
def _checkpoint(uri: str, storage_json: str) -> dict[str, Any]:
    # Cached per process, like the CLIP model: sweep trials reuse their actor.
    return load_state(uri, StorageOptions.model_validate_json(storage_json))


def checkpoint_uri(cfg: LabelConfig) -> str:
    """``model.checkpoint`` resolved to one checkpoint folder (an output's latest), or a clear error."""
    if not cfg.model.checkpoint:
        raise ConfigError(f"cam_source={cfg.cam_source} labels with a trained network: give model.checkpoint=URI, the "
                          f"output of `wsss train` (its latest checkpoint) or one of its checkpoint folders")
    try:
        return resolve(storage.absolute(cfg.model.checkpoint), cfg.dataset.storage)
    except ValueError as e:
        raise ConfigError(str(e).replace("--checkpoint", "model.checkpoint")) from None


def load_checkpoint(cfg: LabelConfig) -> dict[str, Any]:
    return _checkpoint(checkpoint_uri(cfg), cfg.dataset.storage.model_dump_json())


@dataclass(frozen=True)
class Input:
    """What the platform hands a CAM-source factory as one keyword argument."""

    settings: Callable[[LabelConfig], Any] | None
    """The config values that shape the CAMs through it (None: it does not shape them)."""
    build: Callable[[LabelConfig, ClassSet, torch.device], Any]
    check: Callable[[LabelConfig], Any] | None = None
    """On the driver, before Ray: fails with the fix named when the input cannot be supplied."""
    build_on_driver: bool = False
    """Build the source once on the driver's CPU too, so that an input that does not fit the source
    (a checkpoint of another network or other classes) fails there, named, not in every actor."""


INPUTS: dict[str, Input] = {
    "clip": Input(lambda c: c.model.model_dump(mode="json"), lambda c, _, d: load_clip(c, d)),
    "prompts": Input(lambda c: c.text.model_dump(mode="json"),
                     lambda c, cls, _: build_prompts(cls, c.text.template, c.text.fuse_synonyms, c.text.use_background)),
    "precision": Input(lambda c: c.compute.precision, lambda c, _, d: precision(c, d)),
    "batch_size": Input(None, lambda c, _, d: c.compute.batch_size),
    # the resolved folder, not the URI: an output's latest checkpoint changes as it trains on
    "checkpoint": Input(checkpoint_uri, lambda c, _, d: load_checkpoint(c), check=checkpoint_uri, build_on_driver=True),
    "classes": Input(None, lambda c, cls, _: cls),
    "device": Input(None, lambda c, _, d: d),
}


def source_params(name: str) -> list[str]:
    """The keyword arguments the CAM source's factory takes; one the platform cannot supply fails."""
    params = inspect.signature(CAM_SOURCES.get(name)).parameters
    missing = [p for p, v in params.items() if p not in INPUTS and v.default is inspect.Parameter.empty
               and v.kind is not inspect.Parameter.VAR_KEYWORD]
    if missing:
        raise ConfigError(f"cam_source={name}: its factory needs {missing}, which the platform cannot supply "
                          f"(it supplies {', '.join(INPUTS)})")
    return [p for p in params if p in INPUTS]


def source_settings(cfg: LabelConfig, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What shapes the source's output (or, with ``only``, the part that those inputs shape)."""
    names = [p for p in source_params(cfg.cam_source) if only is None or p in only]
    return {p: INPUTS[p].settings(cfg) for p in names if INPUTS[p].settings is not None}


def build_cam_source(cfg: LabelConfig, classes: ClassSet, device: torch.device) -> Any:
    kwargs = {p: INPUTS[p].build(cfg, classes, device) for p in source_params(cfg.cam_source)}
    return create_cam_source(cfg.cam_source, **kwargs)


def refiner_checkpoint_uri(cfg: LabelConfig, name: str) -> str:
    """``<name>.checkpoint`` resolved to one checkpoint folder (a training output's latest), or a clear error."""
    uri = getattr(cfg, name).checkpoint
    if not uri:
        raise ConfigError(f"refine: {name} runs a trained network: give {name}.checkpoint=URI, the output of "
                          f"`wsss train` (its latest checkpoint) or one of its checkpoint folders")
    try:
        return resolve(storage.absolute(uri), cfg.dataset.storage)
    except ValueError as e:
        raise ConfigError(f"{name}.checkpoint: {e}".replace("--checkpoint", f"{name}.checkpoint")) from None


def refiner_checkpoint(cfg: LabelConfig, name: str) -> dict[str, Any]:
    return _checkpoint(refiner_checkpoint_uri(cfg, name), cfg.dataset.storage.model_dump_json())


def proposer_settings(cfg: LabelConfig, name: str) -> dict[str, Any]:
    """The region proposer a refiner's section names and the settings of its own sub-section
    (``regions.proposer: felzenszwalb`` -> ``regions.felzenszwalb``)."""
    section = getattr(cfg, name)
    settings = getattr(section, section.proposer, None)
    return {"proposer": section.proposer, "settings": settings.model_dump(mode="json") if settings is not None else {}}


def sam_weights(uri: str, options: StorageOptions) -> dict[str, Any] | None:
    """SAM's state dict from a local file or object storage; ``none``: random weights."""
    if not uri:
        raise ConfigError("regions.sam.checkpoint: give the SAM weights (e.g. sam_vit_b_01ec64.pth, a local path or "
                          "s3:// URI), or none for random weights (tests only)")
    return _sam_state(uri, options.model_dump_json())


@functools.lru_cache(maxsize=1)
def _sam_state(uri: str, storage_json: str) -> dict[str, Any] | None:
    # Cached per process, like the CLIP model: sweep trials rebuild the proposer in the same actor.
    found = resolve_weights(uri, StorageOptions.model_validate_json(storage_json))
    if found is None:
        return None
    try:
        return torch.load(io.BytesIO(found) if isinstance(found, bytes) else found, map_location="cpu", weights_only=True)
    except (OSError, storage.StorageError, RuntimeError) as e:
        raise ConfigError(f"regions.sam.checkpoint: cannot read SAM weights from {uri}: {e}") from None


PROPOSER_INPUTS: dict[str, Callable[[Any, StorageOptions, torch.device], Any]] = {
    "checkpoint": lambda v, opts, _: sam_weights(v, opts),
    "device": lambda _, __, d: str(d),
}
"""Proposer-factory arguments the platform turns from the setting's value (a weights URI into the
weights) or adds (the device)."""


def build_proposer(cfg: LabelConfig, name: str, device: torch.device) -> Any:
    chosen = proposer_settings(cfg, name)
    params = inspect.signature(PROPOSERS.get(chosen["proposer"])).parameters
    kwargs = {k: PROPOSER_INPUTS[k](v, cfg.dataset.storage, device) if k in PROPOSER_INPUTS else v
              for k, v in chosen["settings"].items()}
    if "device" in params:
        kwargs["device"] = str(device)
    return create_proposer(chosen["proposer"], **kwargs)


STAGE_SETTINGS: dict[str, Callable[[LabelConfig, str], Any]] = {
    "checkpoint": refiner_checkpoint_uri,  # the folder it resolves to: an output's latest changes as it trains on
    "proposer": proposer_settings,  # the proposer and its own settings
}


def refiner_stage_settings(cfg: LabelConfig, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """What shapes a refiner's own image stage (a sweep's cache key): the section's values, or what
    ``STAGE_SETTINGS`` makes of them."""
    section = getattr(cfg, name).model_dump(mode="json")
    return {k: STAGE_SETTINGS[k](cfg, name) if k in STAGE_SETTINGS else section[k] for k in keys}


REFINER_INPUTS: dict[str, Callable[[LabelConfig, str, torch.device], Any]] = {
    "checkpoint": lambda c, name, _: refiner_checkpoint(c, name),
    "proposer": build_proposer,
    "device": lambda c, _, d: str(d),
}
"""Refiner-factory arguments the platform supplies in place of the section's value (a checkpoint
URI becomes the checkpoint's contents, a proposer's name the proposer built from its sub-section)
or beside it (the device)."""


def refiner_kwargs(cfg: LabelConfig, name: str, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    section = getattr(cfg, name, None)
    params = inspect.signature(REFINERS.get(name)).parameters
    # only the factory's own arguments: a section may also hold what REFINER_INPUTS builds from
    # (the regions proposers' sub-sections)
    kwargs = {k: v for k, v in section.model_dump().items() if k in params} if isinstance(section, BaseModel) else {}
    return kwargs | {p: supply(cfg, name, device) for p, supply in REFINER_INPUTS.items() if p in params}


def build_masker(cfg: LabelConfig, device: torch.device = torch.device("cpu")) -> PseudoMasker:
    """The refiners named by ``cfg.refine`` (each with its section) and the mask settings."""
    refiners = [create_refiner(name, **refiner_kwargs(cfg, name, device)) for name in cfg.refine]
    return PseudoMasker(refiners, **cfg.mask.model_dump())


def build_pipeline(cfg: LabelConfig, classes: ClassSet, device: torch.device) -> LabelingPipeline:
    # Masks from the values the cache keeps, whatever cfg.cache says: a refinement-only pass or a
    # sweep over the cache then reproduces this run's masks and scores.
    return LabelingPipeline(build_cam_source(cfg, classes, device), build_masker(cfg, device),
                            kept_dtype=getattr(torch, outputs.CACHE_DTYPE))


def check_stages(cfg: LabelConfig, classes: ClassSet | None = None) -> None:
    """On the driver, before Ray: the source's inputs can be supplied (and, for inputs that ask for
    it, the source builds with the dataset's ``classes``) and the refiners build (an optional
    package a refiner needs is missing here, not in every actor)."""
    params = source_params(cfg.cam_source)
    for p in params:
        if INPUTS[p].check is not None:
            INPUTS[p].check(cfg)
    if classes is not None and any(INPUTS[p].build_on_driver for p in params):
        try:
            build_cam_source(cfg, classes, torch.device("cpu"))
        except ValueError as e:
            raise ConfigError(f"cam_source={cfg.cam_source} with model.checkpoint={cfg.model.checkpoint}: {e}") from None
    try:
        build_masker(cfg)
    except (ImportError, ValueError) as e:  # a missing package; a checkpoint that is not the refiner's network
        raise ConfigError(f"refine={cfg.refine}: {e}") from None
    if classes is not None:
        check_refiner_classes(cfg, list(classes.names))


def check_refiner_classes(cfg: LabelConfig, names: list[str]) -> None:
    """A refiner's trained network (``<name>.checkpoint``) was trained on this dataset's classes, in its order."""
    for name in cfg.refine:
        if "checkpoint" not in inspect.signature(REFINERS.get(name)).parameters:
            continue
        state = refiner_checkpoint(cfg, name)
        theirs = next((v["class_names"] for v in state.values() if isinstance(v, dict) and "class_names" in v), None)
        if theirs is not None and list(theirs[1:]) != names:
            raise ConfigError(f"{name}.checkpoint: {refiner_checkpoint_uri(cfg, name)} was trained on classes "
                              f"{list(theirs[1:])}, the dataset has {names}: give a checkpoint trained on this dataset's "
                              "classes, in its order")

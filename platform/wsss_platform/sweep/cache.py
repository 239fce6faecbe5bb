"""What a sweep computes once and every trial reuses, kept on the sweep's output storage.

- ``cache/subset.pt``: the scored images (uint8), their labels and ground-truth masks.
- ``cache/features-<key>.pt`` (sources in two stages, e.g. the CLIP ones): per image the
  setting-independent features (CLIP: tokens entering the last block) and the aux every trial's
  refiners can ask for (CLIP attention for every L the space can pick), keyed by the source's
  feature stage and the settings of its feature inputs (model, precision).
- ``cache/cams-<key>.pt``: per image the CAMs and class scores of one source setting (source,
  model, prompts, precision), and the aux too for sources in one stage.
- ``cache/refiner-<name>-<key>.pt``: per image the image stage of a refiner that runs a network of its
  own (the random walk's affinity), keyed by what shapes it (checkpoint, radius; not β or t).

A trial that changes only refinement or mask settings reads them and runs no network; one that
changes the prompts reruns only the second stage. Files are written atomically, so a crash leaves
a cache either complete or absent.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from wsss_core import types
from wsss_core.maps import size_batches
from wsss_core.registry import CAM_SOURCES, REFINERS
from wsss_platform import storage
from wsss_platform.config import ConfigError, build_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import build_masker, source_settings
from wsss_platform.ownership import fingerprint
from wsss_platform.storage import StorageOptions
from wsss_platform.sweep.config import apply_params


@dataclass
class Subset:
    ids: list[str]
    images: list[torch.Tensor]  # uint8 [H, W, 3]
    labels: list[list[int]]
    masks: list[torch.Tensor | None]  # uint8 [H, W]
    class_names: list[str]

    def batches(self, batch_size: int) -> list[list[int]]:
        """Indices in batches of at most ``batch_size`` images of one size."""
        return list(size_batches((im.shape for im in self.images), batch_size))


def save(obj: Any, uri: str, opts: StorageOptions) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(uri, buf.getvalue(), opts)


def load(uri: str, opts: StorageOptions) -> Any:
    return torch.load(io.BytesIO(storage.read_bytes(uri, opts)), weights_only=True)


def subset_uri(output: str) -> str:
    return storage.join(output, "cache", "subset.pt")


def save_subset(s: Subset, uri: str, opts: StorageOptions) -> None:
    save({"ids": s.ids, "images": s.images, "labels": s.labels, "class_names": s.class_names,
           "masks": [m if m is not None else torch.zeros(0, 0, dtype=torch.uint8) for m in s.masks]}, uri, opts)


def load_subset(uri: str, opts: StorageOptions) -> Subset:
    d = load(uri, opts)
    return Subset(d["ids"], d["images"], d["labels"], [m if m.numel() else None for m in d["masks"]], d["class_names"])


def is_staged(cfg: LabelConfig) -> bool:
    return types.is_staged(CAM_SOURCES.get(cfg.cam_source))


def features_uri(output: str, cfg: LabelConfig) -> str:
    """Keyed by the source's feature stage (shared by sources that share it) and what shapes it."""
    source = CAM_SOURCES.get(cfg.cam_source)
    what = {"stage": source.features.__qualname__, "inputs": source_settings(cfg, source.feature_inputs)}
    return storage.join(output, "cache", f"features-{fingerprint(what)[:16]}.pt")


def cams_uri(output: str, cfg: LabelConfig) -> str:
    """Keyed by the source and everything that shapes its CAMs (model, prompts, precision)."""
    what = {"cam_source": cfg.cam_source, "inputs": source_settings(cfg)}
    return storage.join(output, "cache", f"cams-{fingerprint(what)[:16]}.pt")


def refiner_aux_uri(output: str, cfg: LabelConfig, name: str) -> str:
    """Keyed by the refiner and what shapes its image stage (the random walk: checkpoint, radius)."""
    from wsss_platform.label.stages import refiner_stage_settings

    what = {"refiner": name, "inputs": refiner_stage_settings(cfg, name, REFINERS.get(name).image_aux_inputs)}
    return storage.join(output, "cache", f"refiner-{name}-{fingerprint(what)[:16]}.pt")


def compute_refiner_aux(refiner: types.StagedRefiner, subset: Subset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """A staged refiner's image stage for every subset image (batched within size groups). Kept in
    float32: the walk raises the affinity to the power β, which would magnify float16's rounding."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in subset.ids]
    for chunk in subset.batches(batch_size):
        for i, aux in zip(chunk, refiner.image_aux([subset.images[i].numpy() for i in chunk]), strict=True):
            out[i] = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in aux.items()}  # regions: ids
    return out


def compute_features(source: types.StagedCamSource, subset: Subset, aux: Collection[str],
                     batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The setting-independent stage for every subset image (batched within size groups)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in subset.ids]
    for chunk in subset.batches(batch_size):
        feats = source.features(torch.stack([subset.images[i] for i in chunk]), aux)
        for j, i in enumerate(chunk):
            out[i] = {k: (v[j].to(torch.float16) if k in aux else v[j]).cpu() for k, v in feats.items()}
    return out


def compute_cams(source: Any, subset: Subset, features: list[dict[str, torch.Tensor]] | None,
                 aux: Collection[str], batch_size: int) -> list[dict[str, Any]]:
    """Per image ``{"cams": [K, h, w], "scores": [K]}`` (+ ``"aux"`` for a one-stage source)."""
    out: list[dict[str, Any]] = [{} for _ in subset.ids]
    for chunk in subset.batches(batch_size):
        labels = [subset.labels[i] for i in chunk]
        if features is not None:  # the second stage only; aux stays with the features
            stacked = {k: torch.stack([features[i][k] for i in chunk]) for k in features[chunk[0]] if k not in aux}
            results = source.cams_from_features(stacked, labels)
        else:
            results = source([subset.images[i].numpy() for i in chunk], labels, aux=aux)
        for i, r in zip(chunk, results, strict=True):
            out[i] = {"cams": r.cams.float().cpu(), "scores": r.scores.float().cpu()}
            if features is None:
                out[i]["aux"] = {k: v.to(torch.float16).cpu() for k, v in r.aux.items()}
    return out


def outputs_from(subset: Subset, cams: list[dict[str, Any]], features: list[dict[str, torch.Tensor]] | None,
                 aux: Collection[str]) -> list[types.CamOutput]:
    """The source's outputs for the subset, rebuilt from the caches (aux from the features when staged)."""
    out = []
    for i, c in enumerate(cams):
        extra = {k: features[i][k] for k in aux} if features is not None else c.get("aux", {})
        out.append(types.CamOutput(list(subset.labels[i]), c["cams"], c["scores"], extra))
    return out


def aux_needed(label: LabelConfig, dims: list[Any]) -> list[str]:
    """Every aux key a trial's refiners can ask for: the refiners built for every combination of the
    searched values that can change them (``refine`` and the keys of the sections of refiners that
    read aux; a float range by its two ends). The other keys (prompts, mask) never change what refiners read."""
    def values(d):
        if d.kind == "categorical":
            return d.choices
        return range(int(d.low), int(d.high) + 1, int(d.step or 1)) if d.kind == "int" else (d.low, d.high)

    # a refiner that reads no aux (the CRF, PAR, the random walk) cannot change the keys: its values are
    # left out, so that a sweep over random_walk.t builds no AffinityNet per value of t
    relevant = [d for d in dims if d.key == "refine"
                or (d.key.split(".")[0] in REFINERS and REFINERS.get(d.key.split(".")[0]).needs)]
    base = label.model_dump(mode="json")
    keys: set[str] = set()
    for combo in itertools.product(*(values(d) for d in relevant)):
        try:
            cfg = build_config(LabelConfig, apply_params(base, {d.name: v for d, v in zip(relevant, combo, strict=True)}),
                               source="search space")
        except ConfigError:  # values that go only with another choice (checked when the space was parsed)
            continue
        keys |= build_masker(cfg).aux_keys
    return sorted(keys)

"""What a sweep computes once and every trial reuses, kept on the sweep's output storage.

- ``cache/subset.pt``: the scored images (uint8), their labels and ground-truth masks.
- ``cache/features.pt``: per image the tokens entering the last block and the attention averaged
  over every L the search space can pick: the prompt-independent backbone, run once per sweep.
- ``cache/cams-<key>.pt``: per image the Softmax-GradCAMs and class scores of one prompt setting
  (template, synonym fusion, background set): one last-block Grad-CAM per distinct setting.

A trial that only changes refinement or masking settings reads both caches and runs no network.
Files are written atomically, so a crash leaves a cache either complete or absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wsss_core.clip_es import ClipES
from wsss_core.models.clip import ClipViT
from wsss_platform import storage
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import class_set, clip_es_with, load_clip
from wsss_platform.storage import StorageOptions


@dataclass
class Subset:
    ids: list[str]
    images: list[torch.Tensor]  # uint8 [H, W, 3]
    labels: list[list[int]]
    masks: list[torch.Tensor | None]  # uint8 [H, W]
    class_names: list[str]

    def groups(self, start: int = 0, stop: int | None = None) -> dict[tuple[int, int], list[int]]:
        """Indices in [start, stop) grouped by image size (H, W)."""
        out: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(start, len(self.images) if stop is None else stop):
            out[(int(self.images[i].shape[0]), int(self.images[i].shape[1]))].append(i)
        return out

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Indices in batches of at most ``batch_size`` images of one size."""
        for idx in self.groups().values():
            for start in range(0, len(idx), batch_size):
                yield idx[start: start + batch_size]


@dataclass
class Features:
    """Per image: ``x_last`` [S, D]; ``attn[L]`` [N, N] float16; ``grid`` (h, w)."""

    x_last: list[torch.Tensor]
    attn: dict[int, list[torch.Tensor]]
    grid: list[tuple[int, int]]
    seconds: float = 0.0


@dataclass
class Cams:
    """Per image: CAMs [K_i, h, w] float32 and the softmax scores of its classes [K_i]."""

    cams: list[torch.Tensor]
    scores: list[torch.Tensor]
    seconds: float = 0.0


def _save(obj: dict[str, Any], uri: str, opts: StorageOptions) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(uri, buf.getvalue(), opts)


def _load(uri: str, opts: StorageOptions) -> dict[str, Any]:
    return torch.load(io.BytesIO(storage.read_bytes(uri, opts)), weights_only=True)


def subset_uri(output: str) -> str:
    return storage.join(output, "cache", "subset.pt")


def features_uri(output: str) -> str:
    return storage.join(output, "cache", "features.pt")


def cams_uri(output: str, key: str) -> str:
    return storage.join(output, "cache", f"cams-{key}.pt")


def save_subset(s: Subset, uri: str, opts: StorageOptions) -> None:
    _save({"ids": s.ids, "images": s.images, "labels": s.labels, "class_names": s.class_names,
           "masks": [m if m is not None else torch.zeros(0, 0, dtype=torch.uint8) for m in s.masks]}, uri, opts)


def load_subset(uri: str, opts: StorageOptions) -> Subset:
    d = _load(uri, opts)
    return Subset(d["ids"], d["images"], d["labels"], [m if m.numel() else None for m in d["masks"]], d["class_names"])


def save_features(f: Features, uri: str, opts: StorageOptions) -> None:
    _save({"x_last": f.x_last, "attn": {str(k): v for k, v in f.attn.items()}, "grid": [list(g) for g in f.grid],
           "seconds": f.seconds}, uri, opts)


def load_features(uri: str, opts: StorageOptions) -> Features:
    d = _load(uri, opts)
    return Features(d["x_last"], {int(k): v for k, v in d["attn"].items()}, [tuple(g) for g in d["grid"]], d["seconds"])


def save_cams(c: Cams, uri: str, opts: StorageOptions) -> None:
    _save({"cams": c.cams, "scores": c.scores, "seconds": c.seconds}, uri, opts)


def load_cams(uri: str, opts: StorageOptions) -> Cams:
    d = _load(uri, opts)
    return Cams(d["cams"], d["scores"], d["seconds"])


def prompt_key(label: LabelConfig) -> str:
    """Identifies the CAMs: the model and everything that shapes the text features."""
    what = {"model": label.model.model_dump(mode="json"), "text": label.text.model_dump(mode="json"),
            "precision": label.compute.precision}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def clip_es(label: LabelConfig, class_names: list[str], device: torch.device, vit: ClipViT | None = None) -> ClipES:
    """CLIP-ES for ``label`` (loading the model unless ``vit`` is given)."""
    if label.cam_source != "clip_es":
        raise ValueError(f"cam_source {label.cam_source!r} has no cached-feature path")
    return clip_es_with(vit or load_clip(label, device), label, class_set(class_names, label))


def compute_features(es: ClipES, subset: Subset, attn_layers: list[int], batch_size: int) -> Features:
    """The prompt-independent backbone for every subset image (batched within size groups)."""
    t0 = time.perf_counter()
    n = len(subset.images)
    x_last: list[torch.Tensor | None] = [None] * n
    attn: dict[int, list[torch.Tensor | None]] = {}
    grid: list[tuple[int, int]] = [(0, 0)] * n
    for chunk in subset.batches(batch_size):
        x, att, g = es.features(torch.stack([subset.images[i] for i in chunk]), attn_layers)
        for j, i in enumerate(chunk):
            x_last[i], grid[i] = x[j].cpu(), g
            for n_layers, a in att.items():
                attn.setdefault(n_layers, [None] * n)[i] = a[j].to(torch.float16).cpu()
    return Features(x_last, attn, grid, time.perf_counter() - t0)  # type: ignore[arg-type]


def compute_cams(es: ClipES, subset: Subset, features: Features, batch_size: int) -> Cams:
    """Softmax-GradCAMs of one prompt setting from the cached features (last block only)."""
    t0 = time.perf_counter()
    n = len(subset.images)
    cams: list[torch.Tensor | None] = [None] * n
    scores: list[torch.Tensor | None] = [None] * n
    for chunk in subset.batches(batch_size):
        x = torch.stack([features.x_last[i] for i in chunk])
        c, s = es.cams_from_features(x, features.grid[chunk[0]], [subset.labels[i] for i in chunk])
        for j, i in enumerate(chunk):
            cams[i], scores[i] = c[j].float().cpu(), s[j].float().cpu()
    return Cams(cams, scores, time.perf_counter() - t0)  # type: ignore[arg-type]


def attn_layers_needed(label: LabelConfig, dims: list[Any]) -> list[int]:
    """Every L the trials can ask for: the searched range, else the labeling config's value."""
    for d in dims:
        if d.key == "caa.attn_layers":
            values = d.choices if d.kind == "categorical" else range(int(d.low), int(d.high) + 1, int(d.step or 1))
            return sorted({int(v) for v in values})
    return [label.caa.attn_layers]


def np_images(subset: Subset, idx: list[int]) -> list[np.ndarray]:
    return [subset.images[i].numpy() for i in idx]

"""What a sweep's trials run: the objective. Labeling is the first; a training sweep plugs in beside it.

An objective prepares what its trials share (here: the scored subset and the CAM source's caches),
hands Tune a function trainable that reports ``objective`` after each chunk, and draws a preview of
the best trial. The driver (``sweep.job``) knows nothing else of it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from wsss_platform import storage
from wsss_platform.config import ConfigError
from wsss_platform.datasets import open_dataset
from wsss_platform.datasets.base import DatasetError
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import (
    build_cam_source,
    check_model_paths,
    check_stages,
    class_set,
    device_for,
)
from wsss_platform.sweep import cache
from wsss_platform.sweep.config import Dim, SweepConfig
from wsss_platform.sweep.trial import TrialContext


class Objective(Protocol):
    reuse_actors: bool
    """Whether a finished trial's actor may serve the next one (Tune's reuse_actors)."""
    ray_options: dict[str, Any]
    """Options for the local Ray that ``wsss sweep`` starts when no cluster address is given."""

    @classmethod
    def check(cls, cfg: SweepConfig) -> None:
        """Fail before anything starts when the swept config cannot run (missing files, bad pairings)."""
        ...

    def prepare(self, dims: list[Dim], log) -> list[str]:
        """Build what the trials share (on the driver, Ray started); returns the scored item ids."""
        ...

    def trainable(self) -> Any:
        """The Tune function trainable, parameters bound (no credentials in them)."""
        ...

    def preview(self, params: dict[str, Any]) -> bytes | None:
        """A PNG of the trial with ``params`` (the best one), or None."""
        ...

    def resources(self) -> dict[str, float]:
        """What Tune reserves for one trial."""
        ...


class CacheLocks:
    """One trial per prompt setting computes its CAMs; the others wait for the file."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}

    async def claim(self, key: str) -> bool:
        if key in self.events:
            return False
        self.events[key] = asyncio.Event()
        return True

    async def wait(self, key: str, timeout: float) -> bool:
        """True once the claimant is done; False after ``timeout`` s (a claimant that died never releases)."""
        try:
            await asyncio.wait_for(self.events[key].wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def release(self, key: str) -> None:
        self.events[key].set()


def choose_subset(ids: list[str], n: int, seed: int) -> list[str]:
    if n >= len(ids):
        return list(ids)
    keep = set(np.random.default_rng(seed).choice(len(ids), size=n, replace=False).tolist())
    return [i for k, i in enumerate(ids) if k in keep]


def write_subset(cfg: SweepConfig, out: str, log) -> cache.Subset:
    ds = open_dataset(cfg.label.dataset)
    if cfg.objective == "miou" and not ds.has_masks():
        raise ConfigError(f"objective: miou needs ground-truth masks, and {ds.uri} (split {cfg.label.dataset.split}) "
                          "has none; use objective=sharpness, or a split with SegmentationClass masks")
    ids, images, labels, masks = [], [], [], []
    for image_id in choose_subset(ds.ids, cfg.subset.num_images, cfg.subset.seed):
        try:
            row = ds.load(image_id)
        except (DatasetError, storage.StorageError, OSError) as e:
            log(f"[wsss sweep] left out of the subset: {e}")
            continue
        if cfg.objective == "miou" and row.mask is None:
            log(f"[wsss sweep] left out of the subset: {image_id} has no ground-truth mask")
            continue
        ids.append(image_id)
        images.append(torch.from_numpy(row.image))
        labels.append(sorted(int(c) for c in row.labels))
        masks.append(None if row.mask is None else torch.from_numpy(row.mask))
    if not ids:
        raise DatasetError(f"no usable image in the subset of {ds.uri} (split {cfg.label.dataset.split})")
    subset = cache.Subset(ids, images, labels, masks, list(ds.classes.names))
    cache.save_subset(subset, cache.subset_uri(out), cfg.label.dataset.storage)
    return subset


def features_task(label: dict[str, Any], output: str, opts: dict[str, Any], aux: list[str], gpus: float) -> float:
    """Runs on the cluster with a trial's resources: the source's first stage over the subset, once."""
    cfg = LabelConfig.model_validate(label)
    options = storage.StorageOptions.model_validate(opts)
    subset = cache.load_subset(cache.subset_uri(output), options)
    t0 = time.perf_counter()
    source = build_cam_source(cfg, class_set(subset.class_names, cfg), device_for(gpus))
    feats = cache.compute_features(source, subset, aux, cfg.compute.batch_size)
    cache.save(feats, cache.features_uri(output, cfg), options)
    return time.perf_counter() - t0


def cache_features(cfg: SweepConfig, out: str, label_payload: dict[str, Any], aux: list[str], gpus: float,
                    log) -> None:
    """The base source's first stage over the subset, once per sweep, by a Ray task with a trial's
    resources (trials with another source setting compute theirs on demand)."""
    import ray

    log(f"[wsss sweep] backbone features of the subset (once; aux {', '.join(aux) or 'none'}) ...")
    task = ray.remote(features_task).options(num_cpus=cfg.tune.cpus_per_trial, num_gpus=gpus)
    secs = ray.get(task.remote(label_payload, out, label_payload["dataset"]["storage"], aux, gpus))
    log(f"[wsss sweep] features cached in {secs:.1f}s")



class LabelObjective:
    """Pseudo-mask mIoU (or prompt sharpness) of a labeling config on a subset of the split."""

    reuse_actors = True  # the next trial finds the model and caches loaded
    ray_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: SweepConfig, out: str, gpus: float) -> None:
        self.cfg, self.out, self.gpus = cfg, out, gpus
        self.ctx: TrialContext | None = None
        self._locks = None

    @classmethod
    def check(cls, cfg: SweepConfig) -> None:
        check_model_paths(cfg.label)
        check_stages(cfg.label)

    def resources(self) -> dict[str, float]:
        return {"cpu": self.cfg.tune.cpus_per_trial, "gpu": self.gpus}

    def prepare(self, dims: list[Dim], log) -> list[str]:
        import ray

        cfg, out, opts = self.cfg, self.out, self.cfg.label.dataset.storage
        uri = cache.subset_uri(out)
        subset = cache.load_subset(uri, opts) if storage.exists(uri, opts) else write_subset(cfg, out, log)
        log(f"[wsss sweep] {cfg.label.dataset.uri} ({cfg.label.dataset.layout}, split {cfg.label.dataset.split}): "
            f"{len(subset.ids)} images in the subset; objective {cfg.objective} ({cfg.mode}); "
            f"{cfg.tune.num_trials} trials over {', '.join(d.name for d in dims)} -> {out}")
        # No credentials in anything Tune pickles (the trainable's parameters, the experiment state).
        payload = cfg.label.model_dump(mode="json") | {"dataset": cfg.label.dataset.worker_payload()}
        aux = cache.aux_needed(cfg.label, dims)
        if cache.is_staged(cfg.label) and not storage.exists(cache.features_uri(out, cfg.label), opts):
            cache_features(cfg, out, payload, aux, self.gpus, log)
        name = f"wsss-sweep-locks-{uuid.uuid4().hex[:8]}"
        self._locks = ray.remote(CacheLocks).options(name=name, num_cpus=0).remote()  # kept alive by this object
        self.ctx = TrialContext(out, payload, payload["dataset"]["storage"], cfg.objective, cfg.tune.report_chunks,
                                self.gpus, name, tuple(aux))
        return subset.ids

    def trainable(self) -> Any:
        from ray import tune

        from wsss_platform.sweep import trial

        return tune.with_parameters(trial.trainable, ctx=self.ctx)

    def preview(self, params: dict[str, Any]) -> bytes | None:
        from wsss_platform.sweep import trial

        return trial.preview(params, self.ctx, self.cfg.label.tracking.preview_images)


def objective_class(cfg: SweepConfig) -> type:
    """Labeling trials, or training trials when the sweep holds a training config."""
    if cfg.train is None:
        return LabelObjective
    from wsss_platform.sweep.train_objective import TrainObjective

    return TrainObjective

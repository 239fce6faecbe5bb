"""One sweep trial: a labeling config -> pseudo masks of the subset -> objective.

The trial reads the cached outputs of its CAM source (features, and the CAMs of its source
setting) and of its refiners' own networks (the random walk's affinity), computing and caching each
when it is the first trial to ask, refines and masks the
subset chunk by chunk, and reports the running mIoU after each chunk so that ASHA can stop a
poor trial early. The objective is a function of (params, context, report): a training sweep
plugs in its own.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wsss_core.masks import IGNORE
from wsss_core.metrics import ConfusionMatrix
from wsss_core.prompts import sharpness
from wsss_core.types import CamOutput, PseudoMask, is_staged_refiner
from wsss_platform import storage
from wsss_platform.config import build_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import build_cam_source, build_masker, class_set, device_for
from wsss_platform.preview import PreviewRow, grid
from wsss_platform.storage import StorageOptions
from wsss_platform.sweep import cache
from wsss_platform.sweep.config import apply_params


@dataclass(frozen=True)
class TrialContext:
    """What every trial shares (sent once through the object store by ``tune.with_parameters``)."""

    output: str
    label: dict[str, Any]
    storage: dict[str, Any]
    """Storage options without credentials (workers resolve their own)."""
    objective: str
    report_chunks: int
    gpus: float
    locks: str | None = None
    """Name of the actor that lets one trial per cache entry compute it."""
    aux: tuple[str, ...] = ()
    """Every aux key the trials' refiners can read (cached with the source's outputs)."""

    def options(self) -> StorageOptions:
        return StorageOptions.model_validate(self.storage)


# Loaded caches by URI. Tune reuses a trial's actor for the next trial (reuse_actors), so a
# refinement-only trial usually reads nothing from storage; cache files never change once written.
_MEMO: OrderedDict[str, Any] = OrderedDict()
_MEMO_SIZE = 8
CLAIM_WAIT_S = 600.0


def _memo(uri: str, load: Callable[[], Any]) -> Any:
    if uri in _MEMO:
        _MEMO.move_to_end(uri)
        return _MEMO[uri]
    value = _MEMO[uri] = load()
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value


def label_config(ctx: TrialContext, params: dict[str, Any]) -> LabelConfig:
    return build_config(LabelConfig, apply_params(ctx.label, params), source="trial params")


class Scorer:
    """Confusion matrices of the raw, refined and confident-only masks, filled chunk by chunk."""

    def __init__(self, cfg: LabelConfig, subset: cache.Subset, outputs: list[CamOutput], device: torch.device,
                 keep: int = 0) -> None:
        self.cfg, self.subset, self.outputs, self.device = cfg, subset, outputs, device
        self.keep, self.kept = keep, []  # preview rows of the first `keep` images
        self.names = ["background", *subset.class_names]
        self.cm_raw, self.cm, self.cm_conf = (ConfusionMatrix(len(self.names)) for _ in range(3))
        self.masker = build_masker(cfg, device)
        self.done = self.ignored = self.pixels = 0
        self.scored = False

    def add(self, upto: int) -> None:
        """Refine, mask and score images [done, upto)."""
        s, idx = self.subset, list(range(self.done, upto))
        outs = [CamOutput(o.labels, o.cams.to(self.device), o.scores, o.aux) for o in (self.outputs[i] for i in idx)]
        images = [s.images[i].numpy() for i in idx] if self.masker.needs_image else None
        for i, r in zip(idx, self.masker(outs, [tuple(s.images[i].shape[:2]) for i in idx], images), strict=True):
            if i < self.keep:
                self.kept.append(self._row(i, r))
            conf = r.mask_conf
            self.ignored += int((conf == IGNORE).sum())
            self.pixels += conf.numel()
            gt = s.masks[i]
            if gt is None:
                continue
            self.scored = True
            self.cm_raw.update(r.mask_raw, gt)
            self.cm.update(r.mask, gt)
            self.cm_conf.update(r.mask, torch.where(conf == IGNORE, torch.full_like(gt, IGNORE), gt))
        self.done = upto

    def _row(self, i: int, r: PseudoMask) -> PreviewRow:
        s, gt = self.subset, self.subset.masks[i]
        return PreviewRow(s.ids[i], s.images[i].numpy(), r.refined.float().cpu().numpy(),
                          [self.names[c] for c in s.labels[i]], r.mask_conf.cpu().numpy(),
                          None if gt is None else gt.numpy())

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"images": self.done, "ignore_fraction": self.ignored / max(1, self.pixels)}
        if self.scored:
            out |= {"miou": self.cm.miou(), "miou_raw": self.cm_raw.miou(), "miou_confident": self.cm_conf.miou()}
            out |= {f"iou/{n}": v for n, v in zip(self.names, self.cm.iou().tolist(), strict=True) if not math.isnan(v)}
        return out


def _cached(uri: str, ctx: TrialContext, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """A cache entry: from memory or storage, else computed by one trial (the others wait) and saved.
    Returns (value, whether it was cached)."""
    opts = ctx.options()
    if uri in _MEMO or storage.exists(uri, opts):
        return _memo(uri, lambda: cache.load(uri, opts)), True
    locks = _locks(ctx)
    claimed = locks is None or _ray_get(locks.claim.remote(uri))
    if not claimed:
        _ray_get(locks.wait.remote(uri, CLAIM_WAIT_S))  # on timeout: compute it here
        if storage.exists(uri, opts):
            return _memo(uri, lambda: cache.load(uri, opts)), True
    try:
        value = compute()
        cache.save(value, uri, opts)
        _memo(uri, lambda: value)
    finally:
        if locks is not None and claimed:
            _ray_get(locks.release.remote(uri))
    return value, False


def source_outputs(cfg: LabelConfig, ctx: TrialContext, subset: cache.Subset,
                   device: torch.device) -> tuple[list[CamOutput], list[torch.Tensor], bool]:
    """The CAM source's outputs for the subset from the caches: (outputs, class scores, whether
    this setting's CAMs were cached). A source in two stages caches its features apart."""
    def source():
        return build_cam_source(cfg, class_set(subset.class_names, cfg), device)

    bs, aux = cfg.compute.batch_size, ctx.aux
    features = None
    if cache.is_staged(cfg):
        features, _ = _cached(cache.features_uri(ctx.output, cfg), ctx,
                              lambda: cache.compute_features(source(), subset, aux, bs))
    cams, hit = _cached(cache.cams_uri(ctx.output, cfg), ctx,
                        lambda: cache.compute_cams(source(), subset, features, aux, bs))
    return cache.outputs_from(subset, cams, features, aux), [c["scores"] for c in cams], hit


def attach_refiner_aux(cfg: LabelConfig, ctx: TrialContext, subset: cache.Subset, masker,
                       outputs: list[CamOutput]) -> int:
    """The image stage of each refiner that runs a network of its own (the random walk's affinity),
    from the cache or computed once and cached, added to the outputs' aux. Returns how many images
    went through such a network here (0 when all was cached)."""
    ran = 0
    for name, refiner in zip(cfg.refine, masker.cam_refiners + masker.prob_refiners, strict=True):
        if not is_staged_refiner(refiner):
            continue
        staged, hit = _cached(cache.refiner_aux_uri(ctx.output, cfg, name), ctx,
                              lambda r=refiner: cache.compute_refiner_aux(r, subset, cfg.compute.batch_size))
        ran += 0 if hit else len(subset.ids)
        for out, extra in zip(outputs, staged, strict=True):
            out.aux = {**out.aux, **extra}
    return ran


def _locks(ctx: TrialContext):
    if not ctx.locks:
        return None
    import ray

    return ray.get_actor(ctx.locks)


def _ray_get(ref):
    import ray

    return ray.get(ref)


def evaluate(params: dict[str, Any], ctx: TrialContext, report) -> dict[str, Any]:
    """Run one trial, calling ``report(metrics)`` after each chunk; returns the last metrics."""
    cfg = label_config(ctx, params)
    device = device_for(ctx.gpus)
    opts = ctx.options()
    t0 = time.perf_counter()
    s_uri = cache.subset_uri(ctx.output)
    subset = _memo(s_uri, lambda: cache.load_subset(s_uri, opts))
    outputs, scores, hit = source_outputs(cfg, ctx, subset, device)
    scorer = Scorer(cfg, subset, outputs, device)
    refiner_images = attach_refiner_aux(cfg, ctx, subset, scorer.masker, outputs)
    t_cams = time.perf_counter() - t0
    sharp = sharpness([s for s in scores if s.numel()]) if any(s.numel() for s in scores) else float("nan")
    n = len(subset.ids)
    chunks = ctx.report_chunks if ctx.objective == "miou" else 1
    t_refine = 0.0
    metrics: dict[str, Any] = {}
    for upto in sorted({max(1, round(n * (c + 1) / chunks)) for c in range(chunks)}):
        t1 = time.perf_counter()
        scorer.add(upto)
        t_refine += time.perf_counter() - t1
        metrics = scorer.metrics() | {"sharpness": sharp, "cams_cached": int(hit), "refiner_images_run": refiner_images,
                                      "seconds_cams": t_cams,
                                      "seconds_refine": t_refine, "seconds": time.perf_counter() - t0,
                                      "complete": int(upto == n)}
        metrics["objective"] = metrics.get("miou", float("nan")) if ctx.objective == "miou" else sharp
        report(metrics)
    return metrics


def preview(params: dict[str, Any], ctx: TrialContext, n: int) -> bytes | None:
    """The preview grid of a (finished) trial's masks on the first ``n`` images of the subset,
    from the caches (no network runs); None when its CAMs are not cached."""
    cfg = label_config(ctx, params)
    opts = ctx.options()
    if n <= 0 or not storage.exists(cache.cams_uri(ctx.output, cfg), opts):
        return None
    subset = cache.load_subset(cache.subset_uri(ctx.output), opts)
    outputs, _, _ = source_outputs(cfg, ctx, subset, torch.device("cpu"))
    scorer = Scorer(cfg, subset, outputs, torch.device("cpu"), keep=n)
    attach_refiner_aux(cfg, ctx, subset, scorer.masker, outputs)
    scorer.add(min(n, len(subset.ids)))
    order = {image_id: k for k, image_id in enumerate(subset.ids)}
    return grid(sorted(scorer.kept, key=lambda row: order[row.image_id]))


def trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Ray Tune function trainable."""
    from ray import tune

    # Tune starts trials in their own folder; paths in the config are relative to the job's folder.
    if orig := os.environ.get("TUNE_ORIG_WORKING_DIR"):
        os.chdir(orig)
    evaluate(config, ctx, tune.report)

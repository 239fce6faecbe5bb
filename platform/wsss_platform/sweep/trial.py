"""One sweep trial: a labeling config -> pseudo masks of the subset -> objective.

The trial reads the cached features (and the CAMs of its prompt setting, computing and caching
them when it is the first to ask), refines and masks the subset chunk by chunk, and reports the
running mIoU after each chunk so that ASHA can stop a poor trial early.
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

from wsss_core.clip_es import results_for_group
from wsss_core.masks import IGNORE
from wsss_core.metrics import ConfusionMatrix
from wsss_core.prompts import sharpness
from wsss_platform import storage
from wsss_platform.config import build_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.preview import PreviewRow, grid
from wsss_platform.label.stages import caa_params, device_for, load_clip, mask_params
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
    """Name of the actor that lets one trial per prompt setting compute its CAMs."""

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

    def __init__(self, cfg: LabelConfig, subset: cache.Subset, features: cache.Features, cams: cache.Cams,
                 device: torch.device, keep: int = 0) -> None:
        self.cfg, self.subset, self.features, self.cams, self.device = cfg, subset, features, cams, device
        self.keep, self.kept = keep, []  # preview rows of the first `keep` images
        self.names = ["background", *subset.class_names]
        self.cm_raw, self.cm, self.cm_conf = (ConfusionMatrix(len(self.names)) for _ in range(3))
        self.caa, self.masks = caa_params(cfg), mask_params(cfg)
        self.layers = min(cfg.caa.attn_layers, max(features.attn))
        self.done = self.ignored = self.pixels = 0
        self.scored = False

    def add(self, upto: int) -> None:
        """Refine, mask and score images [done, upto)."""
        s = self.subset
        for size, idx in s.groups(self.done, upto).items():
            attn = torch.stack([self.features.attn[self.layers][i] for i in idx]).to(self.device, torch.float32)
            group = results_for_group([self.cams.cams[i].to(self.device) for i in idx], attn, [s.labels[i] for i in idx],
                                      size, self.caa, self.masks, cache.np_images(s, idx) if self.masks.crf else None)
            for i, r in zip(idx, group, strict=True):
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

    def _row(self, i: int, r) -> PreviewRow:
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


def _cams_for(cfg: LabelConfig, ctx: TrialContext, subset: cache.Subset, features: cache.Features,
              device: torch.device) -> tuple[cache.Cams, bool]:
    """This prompt setting's CAMs: from the cache, else computed (one trial per setting) and cached."""
    opts = ctx.options()
    uri = cache.cams_uri(ctx.output, cache.prompt_key(cfg))
    if uri in _MEMO or storage.exists(uri, opts):
        return _memo(uri, lambda: cache.load_cams(uri, opts)), True
    locks = _locks(ctx)
    claimed = locks is None or _ray_get(locks.claim.remote(uri))
    if not claimed:
        _ray_get(locks.wait.remote(uri, CLAIM_WAIT_S))  # on timeout: compute them here
        if storage.exists(uri, opts):
            return _memo(uri, lambda: cache.load_cams(uri, opts)), True
    try:
        model_key = f"model:{cfg.model.name}|{cfg.model.pretrained}|{device}"
        vit = _memo(model_key, lambda: load_clip(cfg, device))
        es = cache.clip_es(cfg, subset.class_names, device, vit)
        cams = cache.compute_cams(es, subset, features, cfg.compute.batch_size)
        cache.save_cams(cams, uri, opts)
        _memo(uri, lambda: cams)
    finally:
        if locks is not None and claimed:
            _ray_get(locks.release.remote(uri))
    return cams, False


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
    s_uri, f_uri = cache.subset_uri(ctx.output), cache.features_uri(ctx.output)
    subset = _memo(s_uri, lambda: cache.load_subset(s_uri, opts))
    features = _memo(f_uri, lambda: cache.load_features(f_uri, opts))
    cams, hit = _cams_for(cfg, ctx, subset, features, device)
    t_cams = time.perf_counter() - t0
    sharp = sharpness([s for s in cams.scores if s.numel()]) if any(s.numel() for s in cams.scores) else float("nan")
    n = len(subset.ids)
    chunks = ctx.report_chunks if ctx.objective == "miou" else 1
    scorer = Scorer(cfg, subset, features, cams, device)
    t_refine = 0.0
    metrics: dict[str, Any] = {}
    for upto in sorted({max(1, round(n * (c + 1) / chunks)) for c in range(chunks)}):
        t1 = time.perf_counter()
        scorer.add(upto)
        t_refine += time.perf_counter() - t1
        metrics = scorer.metrics() | {"sharpness": sharp, "cams_cached": int(hit), "seconds_cams": t_cams,
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
    uri = cache.cams_uri(ctx.output, cache.prompt_key(cfg))
    if n <= 0 or not storage.exists(uri, opts):
        return None
    subset = cache.load_subset(cache.subset_uri(ctx.output), opts)
    features = cache.load_features(cache.features_uri(ctx.output), opts)
    scorer = Scorer(cfg, subset, features, cache.load_cams(uri, opts), torch.device("cpu"), keep=n)
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

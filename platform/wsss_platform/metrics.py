"""Live Prometheus metrics of the jobs, exported through Ray (``ray.util.metrics``).

Each node's Ray metrics agent serves them at its metrics-export port next to Ray's own ``ray_*``
series, so one Prometheus scrape of each node sees both. Ray prefixes an
application metric with ``ray_``: ``wsss_label_images`` is scraped as ``ray_wsss_label_images``
(a counter as ``…_total``, a histogram as ``…_bucket`` / ``…_sum`` / ``…_count``). :data:`METRICS` is the one list of names,
kinds and tags; ``dashboards/README.md`` documents it and a test checks the two agree.

A metric is created on first use in the process that records it (a labeling actor, rank 0 of a
training group, a sweep's driver); outside Ray (a unit test, a plain script) recording is a no-op.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
SHARES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    boundaries: list[float] = field(default_factory=list)


METRICS = {m.name: m for m in [
    Metric("wsss_label_images", "counter", "images a labeling job finished, by outcome (status: done | failed)",
           ("source", "status")),
    Metric("wsss_label_stage_seconds", "histogram",
           "seconds one image spends in a labeling stage (stage: load | infer | write)", ("source", "stage"), SECONDS),
    Metric("wsss_label_foreground_share", "histogram",
           "share of an image's pixels a pseudo mask calls foreground (confident, not ignored)", ("source",), SHARES),
    Metric("wsss_label_ignore_share", "histogram",
           "share of an image's pixels a pseudo mask leaves ignored (255: low confidence)", ("source",), SHARES),
    Metric("wsss_train_iterations", "counter", "optimiser steps a training job ran", ("recipe",)),
    Metric("wsss_train_loss", "gauge", "the last step's loss, each term (term: loss = the total, loss/cls, ...)",
           ("recipe", "term")),
    Metric("wsss_train_images_per_second", "gauge", "training throughput of the whole worker group", ("recipe",)),
    Metric("wsss_train_val_miou", "gauge",
           "the last validation's mIoU (metric: val_miou, val_cam_miou, val_seg_miou, val_rw_miou, ...)",
           ("recipe", "metric")),
    Metric("wsss_sweep_trials", "counter", "trials a sweep finished (status: complete | stopped | failed)",
           ("status",)),
    Metric("wsss_sweep_best_objective", "gauge", "the best objective value a sweep has seen so far", ("objective",)),
]}


@functools.cache
def _instrument(name: str) -> Any:
    from ray.util import metrics

    m = METRICS[name]
    if m.kind == "counter":
        return metrics.Counter(m.name, m.description, tag_keys=m.tags)
    if m.kind == "gauge":
        return metrics.Gauge(m.name, m.description, tag_keys=m.tags)
    return metrics.Histogram(m.name, m.description, boundaries=m.boundaries, tag_keys=m.tags)


def _live() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def record(name: str, value: float, **tags: str) -> None:
    """Add (counter), set (gauge) or observe (histogram) ``value`` under ``tags``; a no-op outside Ray."""
    if not _live() or name in _broken:
        return
    m = METRICS[name]
    tags = {k: str(v) for k, v in tags.items()}
    try:
        inst = _instrument(name)
        if m.kind == "counter":
            inst.inc(value, tags=tags)
        elif m.kind == "gauge":
            inst.set(value, tags=tags)
        else:
            inst.observe(value, tags=tags)
    except Exception as e:  # monitoring must never fail the job it watches: say so once, then skip it
        _broken.add(name)
        logging.getLogger(__name__).warning("metric %s not exported: %s: %s", name, type(e).__name__, e)


_broken: set[str] = set()


def record_label_rows(rows: Iterable[Mapping[str, Any]], source: str, write_seconds: float) -> None:
    """A labeling batch's manifest rows: outcomes, stage seconds, mask shares."""
    for r in rows:
        record("wsss_label_images", 1, source=source, status=r["status"])
        record("wsss_label_stage_seconds", r["seconds_load"], source=source, stage="load")
        if r["status"] == "done":
            record("wsss_label_stage_seconds", r["seconds_infer"], source=source, stage="infer")
            record("wsss_label_stage_seconds", write_seconds, source=source, stage="write")
            record("wsss_label_foreground_share", r["fg_fraction"], source=source)
            record("wsss_label_ignore_share", r["ignore_fraction"], source=source)


def record_train_step(recipe: str, metrics: Mapping[str, float], world_size: int) -> None:
    """One training step as rank 0 saw it (its throughput times the group's size)."""
    record("wsss_train_iterations", 1, recipe=recipe)
    for key, value in metrics.items():
        if key == "loss" or key.startswith("loss/"):
            record("wsss_train_loss", value, recipe=recipe, term=key)
        elif key.startswith("val_") and key.endswith("miou"):
            record("wsss_train_val_miou", value, recipe=recipe, metric=key)
    if "images_per_s" in metrics:
        record("wsss_train_images_per_second", metrics["images_per_s"] * world_size, recipe=recipe)

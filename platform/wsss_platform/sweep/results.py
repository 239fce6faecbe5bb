"""What a finished (or interrupted) sweep reports: one row per trial, the counts, the best trial and
its labeling config as ``best.yaml``."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.csv
import yaml

from wsss_platform import storage
from wsss_platform.config import build_config
from wsss_platform.sweep.config import Dim, SweepConfig, apply_params, resolve_params
from wsss_platform.sweep.state import SweepSummary


def best_job_data(cfg: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The swept (labeling or training) config as the user wrote it, with the best params; credentials left out."""
    data = cfg.job.model_dump(mode="json", exclude_unset=True)
    st = data.get("dataset", {}).get("storage", {})
    for k in ("key", "secret"):
        st.pop(k, None)
    out = apply_params(data, params)
    build_config(type(cfg.job), out, source="best config")  # what `wsss label` / `wsss train` will do with it
    return out


def trial_rows(results, dims: list[Dim], n_images: int) -> list[dict[str, Any]]:
    names = [d.name for d in dims]
    rows = []
    for r in results:
        m = r.metrics or {}
        status = "error" if r.error else ("complete" if m.get("complete") == 1 else ("stopped" if m else "pending"))
        row = {"trial": str(m.get("trial_id") or os.path.basename(str(r.path))), "status": status,
               "objective": m.get("objective"), "miou": m.get("miou"), "miou_raw": m.get("miou_raw"),
               "miou_confident": m.get("miou_confident"), "sharpness": m.get("sharpness"),
               "ignore_fraction": m.get("ignore_fraction"), "images": m.get("images"), "of_images": n_images,
               "cams_cached": m.get("cams_cached"), "refiner_images_run": m.get("refiner_images_run"),
               "seconds": m.get("seconds"),
               "error": str(r.error).splitlines()[0][:500] if r.error else None}
        row |= {f"param:{k}": (r.config or {}).get(k) for k in names}
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], uri: str, opts) -> bytes:
    table = pa.Table.from_pylist([{k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in r.items()}
                                  for r in rows])
    sink = pa.BufferOutputStream()
    pyarrow.csv.write_csv(table, sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(uri, data, opts)
    return data


def tally(cfg: SweepConfig, rows: list[dict[str, Any]], summary: SweepSummary, t_start: float) -> int:
    """Trial counts into the summary; returns how many trials finished (one way or another)."""
    summary.complete = sum(r["status"] == "complete" for r in rows)
    summary.stopped = sum(r["status"] == "stopped" for r in rows)
    summary.errored = sum(r["status"] == "error" for r in rows)
    finished = summary.complete + summary.stopped + summary.errored
    summary.seconds = time.perf_counter() - t_start
    budget_hit = cfg.tune.time_budget_s is not None and summary.seconds >= cfg.tune.time_budget_s
    summary.interrupted = finished < summary.num_trials and not budget_hit
    return finished


def write_best(cfg: SweepConfig, rows: list[dict[str, Any]], out: str,
          summary: SweepSummary) -> tuple[dict[str, Any], str] | None:
    """The best scored trial's row and the ``best.yaml`` text written for it; None when none scored."""
    scored = [r for r in rows if r["status"] == "complete" and r["objective"] is not None and not math.isnan(r["objective"])]
    if not scored:
        return None
    # Ties (common: mask.mu does not move miou) go to the earliest trial, so a rerun picks the same one.
    scored.sort(key=lambda r: r["trial"])
    best = (max if cfg.mode == "max" else min)(scored, key=lambda r: r["objective"])
    summary.best_trial, summary.best_value = best["trial"], float(best["objective"])
    summary.best_yaml = storage.join(out, "best.yaml")
    summary.best_params = resolve_params(
        {k[6:]: v for k, v in best.items() if k.startswith("param:") and v is not None}, cfg.label.mask.bg_rule)
    on = (f"the val split of {cfg.train.dataset.uri}" if cfg.train is not None
          else f"{best['images']} images of {cfg.label.dataset.uri}")
    command = "wsss train segmenter" if cfg.train is not None else "wsss label"
    header = (f"# Best trial {best['trial']} of the sweep in {out}: {cfg.objective} = {best['objective']:.4f} on {on}.\n"
              f"# Run it (from the folder the sweep ran in): {command} --config {summary.best_yaml}\n")
    text = header + yaml.safe_dump(best_job_data(cfg, summary.best_params), sort_keys=False)
    storage.write_text(summary.best_yaml, text, cfg.storage)
    return best, text

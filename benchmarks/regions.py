"""Pseudo masks voted into regions (``refine: [..., regions]``) on the synthshapes yardstick (2 CPU cores).

    python benchmarks/regions.py [--workdir bench-regions] [--trials 40] [--subset 100] [--sam]

1. Seconds per image of each region proposer on dev images (SAM: ViT-B with random weights, which
   costs what trained ones do; its masks mean nothing here).
2. A `wsss sweep` over CAA, CRF and regions keys on a 100-image subset of ../shared/benchmarks/synthshapes/dev
   (``refine`` one of [caa, regions] / [caa, crf, regions] / [caa, regions, crf], the proposer and its
   scale, inside, cover, CAA's box threshold, the background threshold and the CRF's colour kernel).
3. `wsss label` over all 200 dev images with: CAA alone and CAA + CRF (jobs/configs/synthshapes.yaml), the
   sweep's best.yaml, and that config without ``regions``; each scored on the images the sweep never
   saw (held out), from the per-image confusion entries of the run's manifest.
Target: the best config ≥ 0.72 mIoU on the held-out images. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from wsss_core.metrics import ConfusionMatrix
from wsss_core.registry import create_proposer
from wsss_platform import storage
from wsss_platform.config import build_config, load_config
from wsss_platform.datasets import DatasetConfig, open_dataset
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label
from wsss_platform.sweep import cache
from wsss_platform.sweep.config import load_sweep_config
from wsss_platform.sweep.job import run_sweep

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "jobs" / "configs" / "synthshapes.yaml"
DEV = ROOT.parent / "shared" / "benchmarks" / "synthshapes" / "dev"
SPACE = {
    "refine": {"choices": [["caa", "regions"], ["caa", "crf", "regions"], ["caa", "regions", "crf"]]},
    "regions.proposer": {"choices": ["felzenszwalb", "slic"]},
    "regions.felzenszwalb.scale": {"low": 30.0, "high": 400.0, "log": True},
    "regions.slic.n_segments": {"low": 50, "high": 400},
    "regions.inside": {"low": 0.3, "high": 0.8},
    "regions.cover": {"low": 0.5, "high": 1.0},
    "caa.box_threshold": {"low": 0.2, "high": 0.8},
    "mask.bg_value": {"low": 0.3, "high": 0.7},
    "crf.bilateral_srgb": {"low": 3.0, "high": 30.0, "log": True},
    "crf.bilateral_compat": {"low": 2.0, "high": 20.0, "log": True},
}


def proposer_seconds(n: int = 20, sam: bool = False) -> dict[str, float]:
    ds = open_dataset(DatasetConfig(uri=str(DEV), split="train"))
    images = [ds.load(i).image for i in ds.ids[:n]]
    out = {}
    for name, kwargs, count in (("felzenszwalb", {}, n), ("slic", {}, n), *((("sam", {}, 1),) if sam else ())):
        try:
            proposer = create_proposer(name, **kwargs)
        except ImportError as e:
            print(f"{name}: skipped ({e})", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        for im in images[:count]:
            proposer.propose(im)
        out[name] = (time.perf_counter() - t0) / count
    return out


def held_out_miou(output: str, held: set[str], num_classes: int) -> float:
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, "manifest.parquet")))).to_pylist()
    cm = ConfusionMatrix(num_classes)
    for row in table:
        if row["image_id"] in held and row["status"] == "done":
            cm.matrix.view(-1).index_add_(0, torch.tensor(row["cm_index"], dtype=torch.long),
                                          torch.tensor(row["cm_count"], dtype=torch.int64))
    return cm.miou()


def label(workdir: Path, name: str, config: str | dict, extra: list[str]) -> tuple[str, float]:
    out = str(workdir / name)
    args = [f"dataset.uri={DEV}", f"output={out}", "overwrite=true", "tracking.enabled=false", *extra]
    cfg = load_config(LabelConfig, str(config), args) if isinstance(config, str) else build_config(LabelConfig, config, args)
    t0 = time.perf_counter()
    run_label(cfg, log=lambda s: None)
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench-regions")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--subset", type=int, default=100, help="sweep images; the rest of the 200 are held out")
    p.add_argument("--sam", action="store_true", help="also time SAM (ViT-B, random weights: minutes an image on 2 cores)")
    args = p.parse_args()
    if not DEV.is_dir():
        print(f"needs {DEV}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seconds = proposer_seconds(sam=args.sam)
    base = yaml.safe_load(BASE.read_text())
    base["dataset"]["uri"], base["model"] = str(DEV), {k: str((ROOT / v).resolve()) for k, v in base["model"].items()}  # relative to the repo root
    doc = {"label": base, "objective": "miou", "subset": {"num_images": args.subset, "seed": 0}, "search_space": SPACE,
           "tune": {"num_trials": args.trials, "max_concurrent_trials": 2, "seed": 0, "startup_trials": 10,
                    "early_stopping": True, "report_chunks": 4},
           "output": str(work / "sweep"), "tracking": {"enabled": False}}
    (work / "sweep.yaml").write_text(yaml.safe_dump(doc))
    t0 = time.perf_counter()
    cfg, dims = load_sweep_config(work / "sweep.yaml")
    summary = run_sweep(cfg, dims, log=lambda s: None)
    sweep_s = time.perf_counter() - t0
    subset = set(cache.load_subset(cache.subset_uri(str(work / "sweep")), cfg.storage).ids)
    ds = open_dataset(DatasetConfig(uri=str(DEV), split="train"))
    held, n_cls = set(ds.ids) - subset, ds.classes.num_classes + 1
    best = yaml.safe_load((work / "sweep" / "best.yaml").read_text())
    without = dict(best, refine=[r for r in best["refine"] if r != "regions"])
    rows = []
    for name, config, extra in (("CAA", str(BASE), []), ("CAA + CRF", str(BASE), ["refine=[caa, crf]"]),
                                ("sweep's best, without regions", without, []), ("sweep's best", best, [])):
        out, s = label(work, name.replace(" ", "_").replace("'", "").replace(",", ""), config, extra)
        rows.append((name, held_out_miou(out, held, n_cls), held_out_miou(out, subset, n_cls), s))
    print(f"\n{platform.machine()} CPU, 2 cores; synthshapes dev: {len(subset)} sweep images, {len(held)} held out\n")
    print("| proposer | s per image |\n|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.3f} |")
    print(f"\nsweep: {summary.num_trials} trials in {sweep_s:.0f} s; best: refine {best['refine']}, "
          f"regions {best.get('regions')}, caa.box_threshold {best['caa']['box_threshold']:.3f}, "
          f"mask.bg_value {best['mask']['bg_value']:.3f}, crf {best.get('crf')}\n")
    print("| masks from | mIoU, held out | mIoU, sweep subset | labeling s (200 images) |\n|---|---|---|---|")
    for name, h, s_, s in rows:
        print(f"| {name} | {h:.4f} | {s_:.4f} | {s:.0f} |")
    print(f"\ntarget ≥ 0.72 held out: {'met' if rows[-1][1] >= 0.72 else 'NOT met'} ({rows[-1][1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The segmenter on CLIP-ES pseudo masks, on the synthshapes yardstick (≤ 30 min on 2 CPU cores).

    python benchmarks/segmenter.py [--workdir bench-segmenter] [--iterations 200] [--mus 0.8,0.9]

1. ``wsss label`` the trainval train split (1,000 images) with CLIP-ES + CAA on the tiny CLIP
   (``jobs/configs/synthshapes.yaml``): the pseudo masks' mIoU against the train ground truth.
2. ``wsss train segmenter`` from the tiny CLIP's visual tower (LargeFOV head), one schedule for all:
   (a) on the ground truth (upper bound), (b) on the pseudo masks with plain cross-entropy (mu 0),
   (c) with CGL at mu 0.95 and at each of ``--mus`` (the small sweep): val mIoU (200 images,
   at the schedule's eval scale) of each. The schedule is jobs/configs/synthshapes-train.yaml's.
Targets: (c) ≥ (b) and (c) ≥ 0.95 × the pseudo masks' train mIoU. Prints one Markdown table.
A rerun reuses the label output (``wsss label`` resumes) but retrains every model.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

import torch

from wsss_platform.config import load_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label
from wsss_platform.train.config import TrainConfig
from wsss_platform.train.job import run_train

DATA = "../shared/benchmarks/synthshapes/trainval"


def train(workdir: str, name: str, pseudo: str, mu: float, args: argparse.Namespace) -> tuple[float, float]:
    out = os.path.join(workdir, f"seg-{name}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(TrainConfig, "jobs/configs/synthshapes-train.yaml", [
        f"dataset.uri={DATA}", f"output={out}", f"train.pseudo_masks={pseudo}", f"train.mu={mu}",
        f"train.iterations={args.iterations}", f"train.checkpoint_every={args.iterations}",
        f"train.eval_every={args.iterations}", "compute.num_workers=1", "compute.cpus_per_worker=1.5",
        f"compute.torch_threads={args.threads}", "tracking.enabled=false"])
    t0 = time.perf_counter()
    summary = run_train(cfg, log=lambda s: None)
    return float(summary.val_miou), time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench-segmenter")
    p.add_argument("--iterations", type=int, default=200, help="per training (the rest of the schedule: "
                   "jobs/configs/synthshapes-train.yaml)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mus", default="0.8,0.9", help="the small CGL sweep beside 0.95")
    args = p.parse_args()
    if not os.path.isdir(DATA):
        print(f"{DATA} is not here: run from the repo root with ../shared present", file=sys.stderr)
        return 1
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False, logging_level="ERROR")
    t_start = time.perf_counter()
    labels = os.path.join(args.workdir, "labels")
    label_cfg = load_config(LabelConfig, "jobs/configs/synthshapes.yaml", [
        f"dataset.uri={DATA}", f"output={labels}", "tracking.enabled=false", "cache=none",
        f"compute.torch_threads={args.threads}", f"compute.cpus_per_actor={args.threads}"])
    t0 = time.perf_counter()
    pseudo = run_label(label_cfg, log=lambda s: None)
    t_label = time.perf_counter() - t0
    rows = [("pseudo masks (CLIP-ES + CAA), train split", pseudo.miou, t_label, "")]
    gt, t = train(args.workdir, "gt", "none", 0.0, args)
    rows.append(("(a) segmenter, ground truth (upper bound)", gt, t, ""))
    ce, t = train(args.workdir, "mu0", labels, 0.0, args)
    rows.append(("(b) segmenter, pseudo masks, cross-entropy (mu 0)", ce, t, ""))
    cgl = {}
    for mu in [0.95, *(float(m) for m in args.mus.split(",") if m)]:
        cgl[mu], t = train(args.workdir, f"mu{mu}", labels, mu, args)
        rows.append((f"(c) segmenter, pseudo masks, CGL mu {mu}", cgl[mu], t, ""))
    best = max(cgl, key=cgl.get)
    total = time.perf_counter() - t_start
    t = load_config(TrainConfig, "jobs/configs/synthshapes-train.yaml").train
    print(f"\nsynthshapes trainval, tiny CLIP; {platform.machine()} CPU, {args.threads} torch threads, torch "
          f"{torch.__version__}; segmenter: tiny CLIP visual tower + LargeFOV, {args.iterations} iterations × "
          f"batch {t.batch_size} of {t.crop_size}² crops at scale {t.scale_range}, {t.optimizer} lr {t.lr} (head "
          f"×{t.head_lr_mult:g}), val at scale {t.eval_scales}\n")
    print("| what | mIoU | seconds |\n|---|---|---|")
    for name, miou, secs, _ in rows:
        print(f"| {name} | {miou:.4f} | {secs:.0f} |")
    c95 = cgl[0.95]
    print(f"\n(c) mu 0.95 ≥ (b): {'met' if c95 >= ce else 'NOT met'} ({c95:.4f} vs {ce:.4f}); best mu of the sweep "
          f"{best} ({cgl[best]:.4f}) ≥ (b): {'met' if cgl[best] >= ce else 'NOT met'}")
    print(f"(c) ≥ 0.95 × pseudo-mask train mIoU ({0.95 * pseudo.miou:.4f}): mu 0.95 {'met' if c95 >= 0.95 * pseudo.miou else 'NOT met'}"
          f", best mu {'met' if cgl[best] >= 0.95 * pseudo.miou else 'NOT met'}")
    print(f"total {total / 60:.1f} min (target ≤ 30)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

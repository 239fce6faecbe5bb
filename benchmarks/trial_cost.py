"""What a training trial costs with the backbone frozen vs fine-tuned, the same epochs (2 CPU cores).

    python benchmarks/trial_cost.py [--workdir bench-trial-cost] [--epochs 1]

Both train the segmenter of ``jobs/configs/synthshapes-train-frozen.yaml`` (tiny CLIP tower, conv head,
batch 16, whole images) on the trainval train split's ground truth for ``--epochs`` epochs, scored on
the val split at the end, as a sweep's trial is; the frozen one reads a feature cache filled
beforehand (a sweep fills it once for all its trials: that one-off cost is printed apart). Target:
frozen ≤ 10% of fine-tuned. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

import torch
from trainval import DATA, start_ray

from wsss_platform.config import load_config
from wsss_platform.train.config import TrainConfig
from wsss_platform.train.job import run_train

CONFIG = "jobs/configs/synthshapes-train-frozen.yaml"


def trial(workdir: str, name: str, iterations: int, extra: list[str]) -> float:
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(TrainConfig, CONFIG, [
        f"dataset.uri={DATA}", f"output={out}", "train.pseudo_masks=none", f"train.iterations={iterations}",
        f"train.checkpoint_every={iterations}", f"train.eval_every={iterations}",
        f"train.feature_cache={os.path.join(workdir, 'features')}", "tracking.enabled=false", *extra])
    t0 = time.perf_counter()
    run_train(cfg, log=lambda s: None)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench-trial-cost")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    if not start_ray():
        return 1
    import ray

    shutil.rmtree(os.path.join(args.workdir, "features"), ignore_errors=True)
    batch = load_config(TrainConfig, CONFIG).train.batch_size
    iterations = max(1, args.epochs * 1000 // batch)
    fill = trial(args.workdir, "fill", 1, [])  # the cache filled, and one iteration
    frozen = trial(args.workdir, "frozen", iterations, [])
    tuned = trial(args.workdir, "fine-tuned", iterations, ["model.freeze_backbone=false", "train.lr=0.0001",
                                                           "train.head_lr_mult=10"])
    print(f"\nsynthshapes trainval, tiny CLIP; {platform.machine()} CPU, torch {torch.__version__}; {args.epochs} "
          f"epoch(s) = {iterations} iterations × batch {batch}, then the val split scored\n")
    print("| trial | seconds |\n|---|---|")
    print(f"| the sweep's one-off feature cache (1,000 images) + 1 iteration | {fill:.0f} |")
    print(f"| frozen backbone, conv head | {frozen:.0f} |")
    print(f"| fine-tuned backbone, conv head | {tuned:.0f} |")
    print(f"\nfrozen / fine-tuned: {frozen / tuned:.1%} (target ≤ 10%)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

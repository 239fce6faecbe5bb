"""ToCo's token contrast on the synthshapes yardstick (≤ 45 min on 2 CPU cores).

    python benchmarks/toco.py [--workdir bench-toco] [--iterations N] [--train-images 1000] [--runs 1]

``wsss train toco`` on the trainval train split's image-level labels only, from the tiny CLIP's
visual tower (``jobs/configs/synthshapes-toco.yaml``: one schedule for all), three times:
(a) the classification losses only (cls + aux; w_ptc = w_ctc = 0), (b) + PTC, (c) + PTC + CTC (full
ToCo). Each is scored on the 200 val images: the CAM pseudo masks (multi-scale + flip CAM, background
below 0.5) and the segmentation head's masks, next to CLIP-ES's raw CAM (Softmax-GradCAM of the tiny
CLIP, ``jobs/configs/synthshapes.yaml`` with no refiner) on the same images.
Target (the paper's ablation): (b) and (c) above (a). Prints one Markdown table.

``--runs N`` trains each variant N times (seeds 0..N-1; the crops and their order differ between
runs anyway) and checks the target on the means: on 2 CPU cores one run's CAM mIoU moves by up to
~0.08 between runs of the same variant, as much as the effects (``benchmarks/RESULTS.md``). Where
Ray sees a GPU, the trainings run on it (``compute.use_gpu: auto``).

Next to the scores, the mechanism the paper names: over-smoothing, measured as the mean cosine
similarity of the final layer's patch tokens between an object and the background (ground-truth
masks on the token grid, first 60 val images) and within one object, for the tiny CLIP's tower as
loaded and for each trained network.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from trainval import DATA, start_ray

from wsss_core.models.toco import ToCo, create_toco
from wsss_platform.config import load_config
from wsss_platform.datasets import DatasetConfig, open_dataset
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label
from wsss_platform.train.config import ToCoConfig
from wsss_platform.train.job import run_train
from wsss_platform.train.toco import ToCoRecipe

CONFIG = "jobs/configs/synthshapes-toco.yaml"
VARIANTS = {
    "(a) classification only (cls + aux)": ["train.w_ptc=0", "train.w_ctc=0"],
    "(b) + PTC": ["train.w_ctc=0"],
    "(c) + PTC + CTC (ToCo)": [],
}


@torch.no_grad()
def token_similarity(net: ToCo, ds, images: int = 60) -> tuple[float, float]:
    """Mean cosine of the final layer's patch tokens on ``ds``: (object vs background, within one object)."""
    net.eval()
    fg_bg, same = [], []
    for image_id in ds.ids[:images]:
        row = ds.load(image_id)
        tokens = net(net.normalize(torch.from_numpy(np.array(row.image))[None]))["tokens"][0]
        t = F.normalize(tokens.flatten(1).T, dim=-1)
        g = F.interpolate(torch.from_numpy(np.array(row.mask)).float()[None, None], size=tokens.shape[-2:],
                          mode="nearest").flatten().long()
        fg = (g > 0) & (g < 255)
        cos = t @ t.T
        if fg.any() and (g == 0).any():
            fg_bg.append(cos[fg[:, None] & (g == 0)[None]].mean().item())
            same.append(cos[(g[:, None] == g[None]) & fg[:, None]].mean().item())
    return float(np.mean(fg_bg)), float(np.mean(same))


def train(workdir: str, i: int, seed: int, overrides: list[str], args: argparse.Namespace,
          val) -> tuple[dict[str, float], float]:
    out = os.path.join(workdir, f"toco-{i}-seed{seed}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(ToCoConfig, CONFIG, [
        f"dataset.uri={DATA}", f"dataset.limit={args.train_images}", f"output={out}",
        f"train.iterations={args.iterations}", f"train.checkpoint_every={args.iterations}",
        f"train.eval_every={args.iterations}", f"train.seed={seed}", f"compute.torch_threads={args.threads}",
        "tracking.enabled=false", *overrides])
    t0 = time.perf_counter()
    summary = run_train(cfg, log=lambda s: None)
    secs = time.perf_counter() - t0
    net, _ = ToCoRecipe(cfg).load(summary.checkpoint, None)
    return summary.metrics | dict(zip(("fg_bg", "same"), token_similarity(net, val), strict=True)), secs


def cell(values: list[float]) -> str:
    """One run's value, or the mean over runs with each run's value after it."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"**{np.mean(values):.4f}** ({', '.join(f'{v:.4f}' for v in values)})"


def header(args: argparse.Namespace, t) -> str:
    runs = f"{args.runs} runs per variant (seeds 0–{args.runs - 1}; each cell the mean, then each run)" \
        if args.runs > 1 else "one run per variant"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.machine()} CPU"
    return (f"synthshapes trainval ({args.train_images} train images, 200 val), tiny CLIP; {device}, "
            f"{args.threads} torch threads, torch {torch.__version__}; ToCo: tiny CLIP visual tower, {args.iterations} "
            f"iterations × batch {t.batch_size} of {t.crop_size}² crops at scale {t.scale_range}, {t.optimizer} lr "
            f"{t.lr} (heads ×{t.head_lr_mult:g}), training CAMs at {t.cam_scales}, {t.local_crops} CTC crops of "
            f"{t.local_crop_size}², second global view at scale {t.global_view_scale}, colour jitter "
            f"{'on' if t.color_jitter else 'off'}, seg head from iteration {t.seg_from}; val CAM at {t.eval_scales} + "
            f"flip, background < {t.bkg}; {runs}\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench-toco")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"per training (default and the rest of the schedule: {CONFIG})")
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1,
                   help="trainings per variant (seeds 0..N-1); the target is checked on the means")
    args = p.parse_args()
    if not start_ray():
        return 1
    import ray

    t_start = time.perf_counter()
    clip_es = run_label(load_config(LabelConfig, "jobs/configs/synthshapes.yaml", [
        f"dataset.uri={DATA}", "dataset.split=val", f"output={os.path.join(args.workdir, 'clip-es-val')}", "refine=[]",
        "tracking.enabled=false", "cache=none", "overwrite=true", f"compute.torch_threads={args.threads}",
        f"compute.cpus_per_actor={args.threads}"]), log=lambda s: None)
    base, val = load_config(ToCoConfig, CONFIG), open_dataset(DatasetConfig(uri=DATA, split="val"))
    args.iterations = args.iterations or base.train.iterations
    m = base.model
    tower = token_similarity(create_toco(m.backbone, len(val.classes.names), m.pretrained, m.aux_layer, m.proj_dim), val)
    rows = [("CLIP-ES raw CAM (Softmax-GradCAM, tiny CLIP)", [clip_es.miou_raw], None, [tower[0]], [tower[1]],
             time.perf_counter() - t_start)]
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        runs = []
        for seed in range(args.runs):
            metrics, secs = train(args.workdir, i, seed, overrides, args, val)
            runs.append((metrics, secs))
            print(f"{name}, seed {seed}: CAM {metrics['val_cam_miou']:.4f}, head {metrics['val_seg_miou']:.4f}, token "
                  f"cosine object–background {metrics['fg_bg']:.3f} ({secs:.0f}s)", flush=True)
        rows.append((name, *([r[0][k] for r in runs] for k in ("val_cam_miou", "val_seg_miou", "fg_bg", "same")),
                     sum(r[1] for r in runs)))
    print(f"\n{header(args, base.train)}")
    print("| what | val mIoU, CAM pseudo masks | val mIoU, segmentation head | final-layer token cosine: object–background "
          "/ within an object | seconds |\n|---|---|---|---|---|")
    for name, cam, seg, fg_bg, same, secs in rows:
        tower = " (the tower as loaded)" if seg is None else ""
        print(f"| {name} | {cell(cam)} | {'—' if seg is None else cell(seg)} | {np.mean(fg_bg):.3f} / "
              f"{np.mean(same):.3f}{tower} | {secs:.0f} |")
    a, b, c = (float(np.mean(r[1])) for r in rows[1:])
    print(f"\n(b) > (a): {'met' if b > a else 'NOT met'} ({b:.4f} vs {a:.4f}); (c) > (a): "
          f"{'met' if c > a else 'NOT met'} ({c:.4f} vs {a:.4f})")
    print(f"total {(time.perf_counter() - t_start) / 60:.1f} min (target ≤ 45)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

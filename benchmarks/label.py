"""Overhead of the Ray labeling job over the same batched core in a plain loop.

    python benchmarks/label.py [--images 64,320] [--batch 16] [--threads N]

Same machine, same model (random tiny CLIP on CPU, or ViT-B/16 with --model ViT-B-16 on a GPU),
same generated images, same torch threads. (a) a plain loop: decode, ClipES batch call, write mask
+ CAM cache; (b) `wsss label` on a local Ray (actor pool start and per-actor model load included,
Ray itself already started), one labeler actor holding the same CPUs as the loop. Target: (a)/(b)
<= 1.3x on CPU. Prints a Markdown table, one row per dataset size.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

from wsss_core.cams import ClipES
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.pipeline import LabelingPipeline, PseudoMasker
from wsss_core.prompts import build_prompts
from wsss_core.refine import CAA
from wsss_platform import outputs
from wsss_platform.config import build_config
from wsss_platform.datasets import DatasetConfig, open_dataset
from wsss_platform.datasets.base import encode_mask_png
from wsss_platform.datasets.demo import write_demo_dataset
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label


def plain_loop(data: str, out: str, model: str, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    ds = open_dataset(DatasetConfig(uri=data))
    m, tok = create_clip(model, "none")
    es = LabelingPipeline(ClipES(ClipViT(m, tok), build_prompts(ds.classes), batch_size=batch), PseudoMasker([CAA()]))
    t0 = time.perf_counter()
    for i in range(0, len(ds.ids), batch):
        rows = [ds.load(x) for x in ds.ids[i:i + batch]]
        for row, r in zip(rows, es([r.image for r in rows], [r.labels for r in rows]), strict=True):
            with open(f"{out}/{row.image_id}.npz", "wb") as f:
                f.write(outputs.encode_cams(r.cams.numpy(), r.labels, row.image.shape[:2], r.class_scores.numpy()))
            with open(f"{out}/{row.image_id}.png", "wb") as f:
                f.write(encode_mask_png(r.mask_conf.numpy()))
    return len(ds.ids) / (time.perf_counter() - t0)


def ray_job(data: str, out: str, model: str, batch: int, threads: int) -> float:
    cfg = build_config(LabelConfig, {}, [f"dataset.uri={data}", f"output={out}", f"model.name={model}",
                                         "model.pretrained=none", "refine=[caa]", f"compute.batch_size={batch}",
                                         f"compute.torch_threads={threads}", f"compute.cpus_per_actor={threads}",
                                         "tracking.enabled=false"])
    run_label(cfg)  # warm: starts Ray, loads the model in the actors
    summary = run_label(cfg.model_copy(update={"overwrite": True}))
    return summary.images_per_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="64,320", help="dataset sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    rows = []
    for size in (int(x) for x in args.images.split(",")):
        tmp = tempfile.mkdtemp()
        try:
            data = f"{tmp}/voc"
            write_demo_dataset(data, "voc", size, seed=0)
            n = len(open_dataset(DatasetConfig(uri=data)).ids)
            a_out, b_out = f"{tmp}/a", f"{tmp}/b"
            os.makedirs(a_out)
            a = plain_loop(data, a_out, args.model, args.batch, args.threads)
            b = ray_job(data, b_out, args.model, args.batch, args.threads)
            rows.append((n, a, b))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dev = f"CPU ({platform.machine()}, {args.threads} torch threads)" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"labeling ({args.model}, batch {args.batch}), {dev}")
    print("| images | (a) plain loop img/s | (b) Ray job img/s | overhead (a)/(b) |")
    print("|---|---|---|---|")
    for n, a, b in rows:
        print(f"| {n} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

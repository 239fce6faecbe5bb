"""Throughput of CLIP-ES CAM + CAA: a reference-style loop vs the batched implementation.

    python benchmarks/cams.py                     # CPU: tiny model (+ ViT-B/16 with --vitb)
    python benchmarks/cams.py --device cuda       # GPU: ViT-B/16 at 384x512, random weights

(a) reference-style: one image, one backward per class, CAA per class (fp16 on GPU, fp32 on CPU);
(b) ours: batched over images and classes in one backward, CAA batched (bf16 on GPU, fp32 on CPU).
Images are 384x512 with 2 present classes each (VOC averages ~1.5). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_clip_es import reference_clip_es

from wsss_core.cams import ClipES
from wsss_core.classes import VOC
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.pipeline import LabelingPipeline, PseudoMasker
from wsss_core.prompts import build_prompts
from wsss_core.refine import CAA


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_reference(vit, es, images, labels, dtype, device) -> float:
    fg, bg = es.source.text_features()
    reference_clip_es(vit, fg, bg, images[0], labels[0], dtype)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for img, ls in zip(images, labels, strict=True):
        reference_clip_es(vit, fg, bg, img, ls, dtype)
    sync(device)
    return len(images) / (time.perf_counter() - t0)


def bench_ours(es, images, labels, device, repeats: int = 1) -> tuple[float, float]:
    es(images[: es.source.batch_size], labels[: es.source.batch_size])  # warm-up (and cudnn/cublas autotune)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        es(images, labels)
    sync(device)
    rate = repeats * len(images) / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return rate, peak


def run(model_name: str, device: torch.device, n_ref: int, n_ours: int, batch: int, height: int, width: int):
    model, tok = create_clip(model_name, "none")
    vit = ClipViT(model, tok).to(device)
    gpu = device.type == "cuda"
    ref_dtype, our_dtype = (torch.float16, "bf16") if gpu else (None, "fp32")
    # CLIP-ES CAMs + CAA + masks, no CRF: the GPU part of a labeling actor
    es = LabelingPipeline(ClipES(vit, build_prompts(VOC), precision=our_dtype, batch_size=batch), PseudoMasker([CAA()]))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(max(n_ref, n_ours))]
    labels = [sorted(rng.choice(np.arange(1, 21), 2, replace=False).tolist()) for _ in images]
    ref = bench_reference(vit, es, images[:n_ref], labels[:n_ref], ref_dtype, device)
    ours, peak = bench_ours(es, images[:n_ours], labels[:n_ours], device)
    return ref, ours, peak, "fp16" if gpu else "fp32", our_dtype


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vitb", action="store_true", help="on CPU, also time ViT-B/16 (slow)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", default="384x512")
    args = ap.parse_args()
    device = torch.device(args.device)
    h, w = (int(v) for v in args.size.split("x"))
    rows = []
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
        rows.append(("ViT-B-16", name, *run("ViT-B-16", device, 32, 1024, args.batch, h, w)))
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        rows.append(("tiny", name, *run("tiny", device, 16, 64, args.batch, h, w)))
        if args.vitb:
            rows.append(("ViT-B-16", name, *run("ViT-B-16", device, 2, 8, 8, h, w)))
    print(f"CLIP-ES CAM + CAA throughput, {h}x{w} images, 2 classes each, batch {args.batch}, torch {torch.__version__}")
    print("| model | device | (a) reference loop img/s | (b) ours batched img/s | speed-up | peak GPU mem (ours, GiB) | dtypes (a)/(b) |")
    print("|---|---|---|---|---|---|---|")
    for model, dev, ref, ours, peak, da, db in rows:
        mem = f"{peak:.2f}" if peak == peak else "n/a"
        print(f"| {model} | {dev} | {ref:.1f} | {ours:.1f} | {ours / ref:.1f}x | {mem} | {da}/{db} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

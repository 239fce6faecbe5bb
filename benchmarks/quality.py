"""Pseudo-mask quality on ../shared/benchmarks/synthshapes/dev: CLIP-ES (Softmax-GradCAM) side by side
with the reference figures of its README (per-class-backward implementation, CPU, float32), and
plain GradCAM on the same CLIP, the CLIP-ES paper's baseline, each raw and with CAA.

    python benchmarks/quality.py [--limit N] [--attn-layers L]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from wsss_core.classes import ClassSet
from wsss_core.metrics import ConfusionMatrix
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.pipeline import LabelingPipeline, PseudoMasker
from wsss_core.prompts import build_prompts
from wsss_core.registry import create_cam_source, create_refiner

SYNTH = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks" / "synthshapes"
BACKGROUND = ("background", "texture", "stripes", "noise", "line", "ground", "wall")
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
REFERENCE = {
    "Softmax-GradCAM": (0.491, 0.523, 0.526, 0.480, 0.394),
    "Softmax-GradCAM + CAA": (0.477, 0.516, 0.552, 0.567, 0.542),
}
SOURCES = {"gradcam": "GradCAM", "clip_es": "Softmax-GradCAM"}


def load_synthshapes(root: Path, limit: int | None = None):
    """(ids, images, labels, masks) of the dev split, read with plain PIL (no platform code)."""
    import xml.etree.ElementTree as ET

    import numpy as np
    from PIL import Image

    names = (root / "classes.txt").read_text().split()
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:limit]
    images, labels, masks = [], [], []
    for i in ids:
        images.append(np.asarray(Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB")))
        objs = ET.parse(root / "Annotations" / f"{i}.xml").getroot().iter("object")
        labels.append(sorted({names.index(o.findtext("name")) + 1 for o in objs}))
        masks.append(torch.from_numpy(np.array(Image.open(root / "SegmentationClass" / f"{i}.png"))))
    return names, ids, images, labels, masks


def pipeline_for_synthshapes(names: list[str], source: str = "clip_es", refine: tuple[str, ...] = ("caa",),
                             attn_layers: int = 6, device: str = "cpu", **mask) -> LabelingPipeline:
    """``source`` × ``refine`` on the yardstick's tiny CLIP with its README's prompts."""
    model, tok = create_clip(str(SYNTH / "model" / "tinyclip.json"), str(SYNTH / "model" / "tinyclip.safetensors"))
    vit = ClipViT(model, tok).to(device)
    prompts = build_prompts(ClassSet(tuple(names)), "a clean origami {}.", background=BACKGROUND)
    kwargs = {"caa": {"attn_layers": attn_layers}}
    refiners = [create_refiner(name, **kwargs.get(name, {})) for name in refine]
    return LabelingPipeline(create_cam_source(source, clip=vit, prompts=prompts, batch_size=32),
                            PseudoMasker(refiners, **mask))


def evaluate(results, gts, num_classes: int, thresholds=THRESHOLDS, name: str = "Softmax-GradCAM") -> dict[str, list[float]]:
    """mIoU of raw and CAA-refined masks at each constant background threshold."""
    from wsss_core.masks import cams_to_mask

    table = {}
    for key, attr in ((name, "cams"), (f"{name} + CAA", "refined")):
        row = []
        for tau in thresholds:
            cm = ConfusionMatrix(num_classes + 1)
            for r, gt in zip(results, gts, strict=True):
                maps = torch.nn.functional.interpolate(getattr(r, attr)[None].float(), size=gt.shape, mode="bilinear",
                                                       align_corners=False)[0]
                cm.update(cams_to_mask(maps, r.labels, bg_threshold=tau), gt)
            row.append(cm.miou())
        table[key] = row
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--attn-layers", type=int, default=6)
    args = ap.parse_args()
    if not SYNTH.is_dir():
        print(f"synthshapes not found at {SYNTH}", file=sys.stderr)
        return 1
    names, _, images, labels, gts = load_synthshapes(SYNTH / "dev", args.limit)
    table, times = {}, {}
    for source, name in SOURCES.items():
        pipe = pipeline_for_synthshapes(names, source, attn_layers=args.attn_layers)
        t0 = time.perf_counter()
        results = pipe(images, labels)
        times[name] = time.perf_counter() - t0
        table |= evaluate(results, gts, len(names), name=name)
    print(f"synthshapes dev: {len(images)} images, batched, CAA over {args.attn_layers} blocks ("
          + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + " on CPU)")
    print(f"| masks from | {' | '.join(f'bg {t}' for t in THRESHOLDS)} |")
    print(f"|---|{'---|' * len(THRESHOLDS)}")
    for key, row in table.items():
        ref = REFERENCE.get(key)
        cells = " | ".join(f"{v:.3f}" + (f" (ref {ref[i]:.3f})" if ref else "") for i, v in enumerate(row))
        print(f"| {key} | {cells} |")
    worst = max(abs(v - r) for key, ref in REFERENCE.items() for v, r in zip(table[key], ref, strict=True))
    print(f"largest |ours - reference|: {worst:.4f} (tolerance 0.01)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

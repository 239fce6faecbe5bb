"""CLIP-ES pseudo-mask quality on ../shared/benchmarks/synthshapes/dev, side by side with the
reference figures of its README (per-class-backward implementation, CPU, float32).

    python benchmarks/quality.py [--crf] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from wsss_core.classes import ClassSet
from wsss_core.clip_es import CAAParams, ClipES, MaskParams
from wsss_core.metrics import ConfusionMatrix
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.prompts import build_prompts

SYNTH = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks" / "synthshapes"
BACKGROUND = ("background", "texture", "stripes", "noise", "line", "ground", "wall")
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
REFERENCE = {
    "Softmax-GradCAM": (0.491, 0.523, 0.526, 0.480, 0.394),
    "+ CAA": (0.477, 0.516, 0.552, 0.567, 0.542),
}


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


def clip_es_for_synthshapes(caa: CAAParams, masks: MaskParams, names: list[str], device: str = "cpu") -> ClipES:
    model, tok = create_clip(str(SYNTH / "model" / "tinyclip.json"), str(SYNTH / "model" / "tinyclip.safetensors"))
    vit = ClipViT(model, tok).to(device)
    prompts = build_prompts(ClassSet(tuple(names)), "a clean origami {}.", background=BACKGROUND)
    return ClipES(vit, prompts, caa, masks, batch_size=32)


def evaluate(results, gts, num_classes: int, thresholds=THRESHOLDS) -> dict[str, list[float]]:
    """mIoU of raw and refined masks at each constant background threshold."""
    from wsss_core.masks import cams_to_mask

    table = {}
    for key, attr in (("Softmax-GradCAM", "cams"), ("+ CAA", "refined")):
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
    es = clip_es_for_synthshapes(CAAParams(attn_layers=args.attn_layers), MaskParams(), names)
    t0 = time.perf_counter()
    results = es(images, labels)
    dt = time.perf_counter() - t0
    table = evaluate(results, gts, len(names))
    print(f"synthshapes dev: {len(images)} images, CLIP-ES batched ({dt:.1f}s, {len(images) / dt:.1f} img/s on CPU)")
    print(f"| masks from | {' | '.join(f'bg {t}' for t in THRESHOLDS)} |")
    print(f"|---|{'---|' * len(THRESHOLDS)}")
    for key, row in table.items():
        ref = REFERENCE[key]
        cells = " | ".join(f"{v:.3f} (ref {r:.3f})" for v, r in zip(row, ref, strict=True))
        print(f"| {key} | {cells} |")
    worst = max(abs(v - r) for key, row in table.items() for v, r in zip(row, REFERENCE[key], strict=True))
    print(f"largest |ours - reference|: {worst:.4f} (tolerance 0.01)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

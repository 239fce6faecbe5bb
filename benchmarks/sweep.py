"""Cost of a sweep trial that only changes refinement settings, as a fraction of a full trial.

    python benchmarks/sweep.py [--images 64] [--device cpu|cuda] [--repeats 3]

On ../shared/benchmarks/synthshapes/dev with its tiny CLIP (or generated demo data and the random
tiny model when synthshapes is absent). A *full* trial is what a trial costs with nothing cached:
load the model, run the backbone over the subset, Grad-CAM for its prompts, refine and score. A
*prompt* trial has the features cached (new prompt setting: text features + last-block Grad-CAM).
A *refinement-only* trial has features and CAMs cached (the common case: CAA and mask settings);
"from storage" is the same trial in a fresh actor that first reads the cache files.
Target (issue #5): refinement-only <= 10% of full.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from wsss_platform.config import build_config
from wsss_platform.label import stages
from wsss_platform.label.stages import build_cam_source, build_masker, class_set
from wsss_platform.storage import StorageOptions
from wsss_platform.sweep import cache
from wsss_platform.sweep.config import SweepConfig
from wsss_platform.sweep.objective import write_subset
from wsss_platform.sweep.trial import Scorer

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT.parent / "shared" / "benchmarks" / "synthshapes"


def label_section(workdir: Path) -> dict:
    if (SYNTH / "dev").is_dir():
        return {"dataset": {"uri": str(SYNTH / "dev")}, "model": {"name": str(SYNTH / "model" / "tinyclip.json"),
                "pretrained": str(SYNTH / "model" / "tinyclip.safetensors")},
                "text": {"background": ["background", "texture", "stripes", "noise", "line", "ground", "wall"]},
                "caa": {"attn_layers": 6}, "refine": ["caa"], "compute": {"batch_size": 32}}
    from wsss_platform.datasets.demo import write_demo_dataset

    write_demo_dataset(str(workdir / "demo"), "voc", 80, seed=0)
    return {"dataset": {"uri": str(workdir / "demo")}, "model": {"name": "tiny", "pretrained": "none"},
            "refine": ["caa"], "compute": {"batch_size": 32}}


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    opts = StorageOptions()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out = str(work / "sweep")
        cfg = build_config(SweepConfig, {"label": label_section(work), "subset": {"num_images": args.images},
                                         "search_space": {"caa.t": {"low": 1, "high": 3}}, "output": out})
        label = cfg.label
        subset = write_subset(cfg, out, print)
        aux = sorted(build_masker(label).aux_keys)
        bs, n = label.compute.batch_size, len(subset.ids)

        def source():
            return build_cam_source(label, class_set(subset.class_names, label), device)

        def score(feats, cams, sub=subset):
            s = Scorer(label, sub, cache.outputs_from(sub, cams, feats, aux), device)
            s.add(n)
            return s.metrics()["miou"]

        def full():
            stages._clip.cache_clear()  # a full trial loads the model
            src = source()
            feats = cache.compute_features(src, subset, aux, bs)
            cams = cache.compute_cams(src, subset, feats, aux, bs)
            return feats, cams, score(feats, cams)

        t_full, (feats, cams, miou) = timed(full, args.repeats)

        def prompt_trial():  # the model stays loaded in a reused trial actor; new prompts: text features again
            score(feats, cache.compute_cams(source(), subset, feats, aux, bs))

        def refine_trial():
            score(feats, cams)

        cache.save(feats, cache.features_uri(out, label), opts)
        cache.save(cams, cache.cams_uri(out, label), opts)

        def refine_from_storage():
            score(cache.load(cache.features_uri(out, label), opts), cache.load(cache.cams_uri(out, label), opts),
                  cache.load_subset(cache.subset_uri(out), opts))

        t_prompt, _ = timed(prompt_trial, args.repeats)
        t_refine, _ = timed(refine_trial, args.repeats)
        t_storage, _ = timed(refine_from_storage, args.repeats)
    print(f"sweep trial cost: {len(subset.ids)} images of {label.dataset.uri}, model {Path(label.model.name).name}, "
          f"{args.device}, torch threads {torch.get_num_threads()}, median of {args.repeats} (mIoU {miou:.4f})")
    print("| trial | seconds | fraction of full |")
    print("|---|---|---|")
    for name, t in (("full (model load + backbone + Grad-CAM + refine)", t_full),
                    ("prompt change (cached features)", t_prompt),
                    ("refinement-only (cached features + CAMs)", t_refine),
                    ("refinement-only, caches read from storage", t_storage)):
        print(f"| {name} | {t:.3f} | {t / t_full:.1%} |")
    print(f"target: refinement-only <= 10% of full -> {'met' if t_refine <= 0.1 * t_full else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

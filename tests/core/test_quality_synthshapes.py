"""The batched implementation reproduces the synthshapes reference figures within ±0.01."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_matches_reference_figures(synthshapes):
    import quality

    names, _, images, labels, gts = quality.load_synthshapes(synthshapes / "dev")
    pipe = quality.pipeline_for_synthshapes(names, attn_layers=6)
    table = quality.evaluate(pipe(images, labels), gts, len(names))
    for key, row in table.items():
        for tau, ours, ref in zip(quality.THRESHOLDS, row, quality.REFERENCE[key], strict=True):
            assert ours == pytest.approx(ref, abs=0.01), f"{key} at bg {tau}: {ours:.4f} vs reference {ref}"

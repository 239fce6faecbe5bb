"""The batched implementation reproduces the synthshapes reference figures within ±0.01."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_matches_reference_figures(synthshapes):
    import quality

    from wsss_core.clip_es import CAAParams, MaskParams

    names, _, images, labels, gts = quality.load_synthshapes(synthshapes / "dev")
    es = quality.clip_es_for_synthshapes(CAAParams(attn_layers=6), MaskParams(), names)
    table = quality.evaluate(es(images, labels), gts, len(names))
    for key, row in table.items():
        for tau, ours, ref in zip(quality.THRESHOLDS, row, quality.REFERENCE[key], strict=True):
            assert ours == pytest.approx(ref, abs=0.01), f"{key} at bg {tau}: {ours:.4f} vs reference {ref}"

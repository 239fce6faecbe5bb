"""Batched Softmax-GradCAM equals the reference: one image, one backward per class.

The reference goes through open_clip's own visual forward (mean-pooled patch tokens), hooks the
output of the last block's first LayerNorm and back-propagates one softmax score at a time, as
the CLIP-ES code does with pytorch-grad-cam.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_core.cams import ClipES
from wsss_core.classes import VOC
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.pipeline import LabelingPipeline, PseudoMasker
from wsss_core.prompts import build_prompts
from wsss_core.refine import CAA

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from reference_clip_es import reference_cams


@pytest.fixture(scope="module")
def tiny():
    model, tok = create_clip("tiny", "none")
    vit = ClipViT(model, tok)
    return vit, LabelingPipeline(ClipES(vit, build_prompts(VOC), batch_size=8), PseudoMasker([CAA(attn_layers=2)]))


def test_batched_equals_per_class_loop(tiny):
    vit, es = tiny
    rng = np.random.default_rng(0)
    # two sizes (one native 224, one that needs resizing + interpolation), 1-3 classes each
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)] + \
             [rng.integers(0, 256, (100, 150, 3), dtype=np.uint8) for _ in range(2)]
    labels = [[3, 8, 15], [1], [2, 20], [5, 9]]
    results = es(images, labels)
    fg, bg = es.source.text_features()
    for img, ls, r in zip(images, labels, results, strict=True):
        ref, ref_scores, _ = reference_cams(vit, fg, bg, img, ls)
        assert r.cams.shape == ref.shape
        torch.testing.assert_close(r.cams, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(r.class_scores, ref_scores, atol=1e-5, rtol=1e-4)
    assert results[2].cams.shape[-2:] == (6, 9)  # 100x150 -> nearest multiple of 16: 96x144


def test_other_classes_compete(tiny):
    """The CAM of a class depends on which other classes are present (softmax competition)."""
    vit, es = tiny
    img = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    alone = es([img], [[3]])[0].cams[0]
    together = es([img], [[3, 8]])[0].cams[0]
    assert (alone - together).abs().max() > 1e-3
    fg, bg = es.source.text_features()
    torch.testing.assert_close(together, reference_cams(vit, fg, bg, img, [3, 8])[0][0], atol=1e-4, rtol=0)
    no_bg = LabelingPipeline(ClipES(vit, build_prompts(VOC, use_background=False)), es.masker)
    assert (no_bg([img], [[3, 8]])[0].cams[0] - together).abs().max() > 1e-3


def test_batch_size_and_order_do_not_matter(tiny):
    vit, es = tiny
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (64 + 16 * (i % 2), 96, 3), dtype=np.uint8) for i in range(5)]
    labels = [[1, 2], [3], [], [4, 5, 6], [7]]
    a = es(images, labels)
    b = LabelingPipeline(ClipES(vit, es.source.prompts, batch_size=2), es.masker)(images[::-1], labels[::-1])[::-1]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.cams, y.cams, atol=1e-5, rtol=0)
        torch.testing.assert_close(x.aux["attn/2"], y.aux["attn/2"], atol=1e-6, rtol=0)
        assert torch.equal(x.mask, y.mask)
    assert a[2].mask.sum() == 0 and a[2].cams.shape[0] == 0


def test_attention_matches_explicit_computation(tiny):
    """The CAA attention from the same forward equals nn.MultiheadAttention's own weights."""
    vit, _ = tiny
    pixels = vit.preprocess(torch.randint(0, 256, (2, 64, 80, 3), dtype=torch.uint8))
    _, attn, grid = vit.forward_features(pixels, attn_layers=3)
    x = vit.embed(pixels)
    expected = 0
    for i, blk in enumerate(vit.blocks):
        y = blk.ln_1(x)
        if i >= vit.depth - 3:
            expected = expected + blk.attn(y, y, y, need_weights=True, average_attn_weights=True)[1]
        x = blk(x)
    torch.testing.assert_close(attn, (expected / 3)[:, 1:, 1:], atol=1e-5, rtol=1e-4)
    assert grid == (4, 5)


def test_features_for_several_layer_counts_match_one_at_a_time(tiny):
    """One forward for L in {1, 2, 4} (and out-of-range L, clamped) equals separate forwards."""
    vit, es = tiny
    pixels = vit.preprocess(torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8))
    x_multi, attn, _ = vit.forward_features_multi(pixels, [4, 1, 2, 99])
    assert sorted(attn) == [1, 2, vit.depth]
    for n in (1, 2, 4):
        x_one, a_one, _ = vit.forward_features(pixels, attn_layers=n)
        torch.testing.assert_close(attn[min(n, vit.depth)], a_one, atol=1e-6, rtol=0)
        torch.testing.assert_close(x_multi, x_one, atol=1e-6, rtol=0)
    # CAMs from cached features equal the one-call source
    images = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8)
    labels = [[1, 3], [2]]
    src = es.source
    whole = src(list(images.numpy()), labels, aux=["attn/2"])
    feats = src.features(images, ["attn/2", "attn/1"])
    staged = src.cams_from_features(feats, labels)
    for a, b in zip(whole, staged, strict=True):
        torch.testing.assert_close(a.cams, b.cams, atol=1e-4, rtol=0)  # min–max normalised: float noise of the two calls can grow
        torch.testing.assert_close(a.scores, b.scores)
        torch.testing.assert_close(a.aux["attn/2"], b.aux["attn/2"], atol=1e-6, rtol=0)

"""Background rules, cams_to_mask, confidence and sharpness against direct loops."""

import numpy as np
import pytest
import torch

from wsss_core.classes import VOC, ClassSet
from wsss_core.masks import cams_to_mask, confidence_mask
from wsss_core.prompts import build_prompts, sharpness


def mask_loop(cams, labels, tau=None, alpha=None):
    k, h, w = cams.shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            peak = max(cams[:, y, x]) if k else 0.0
            bg = tau if tau is not None else (1 - peak) ** alpha
            best, best_label = bg, 0
            for c in range(k):
                if cams[c, y, x] > best:
                    best, best_label = cams[c, y, x], labels[c]
            out[y, x] = best_label
    return out


@pytest.mark.parametrize(("tau", "alpha"), [(0.5, None), (0.3, None), (None, 1.0), (None, 16.0)])
def test_cams_to_mask(tau, alpha):
    cams = np.random.default_rng(0).random((3, 7, 9)).astype(np.float32)
    labels = [2, 7, 15]
    got = cams_to_mask(torch.from_numpy(cams), labels, bg_threshold=tau, bg_power=alpha)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), mask_loop(cams, labels, tau, alpha))


def test_cams_to_mask_rules_are_exclusive_and_empty_ok():
    cams = torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match="exactly one"):
        cams_to_mask(cams, [1], bg_threshold=0.5, bg_power=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        cams_to_mask(cams, [1])
    assert cams_to_mask(torch.zeros(0, 4, 4), [], bg_power=1.0).sum() == 0


def test_confidence_mask():
    rng = np.random.default_rng(1)
    scores = rng.random((2, 6, 5)).astype(np.float32)
    mask = rng.integers(0, 3, (6, 5)).astype(np.uint8)
    got = confidence_mask(torch.from_numpy(scores), torch.from_numpy(mask), 0.7).numpy()
    for y in range(6):
        for x in range(5):
            m = max(scores[:, y, x])
            conf = max(1 - m, m)
            assert got[y, x] == (255 if conf < 0.7 else mask[y, x])
    assert (mask != 255).all()  # input untouched


def test_sharpness():
    scores = [torch.tensor([0.5, 0.2, 0.1]), torch.tensor([0.9]), torch.tensor([0.3, 0.3])]
    var = sum(float(np.var(s.numpy())) for s in scores)
    mean = sum(float(np.mean(s.numpy())) for s in scores)
    assert sharpness(scores) == pytest.approx(var / mean, rel=1e-6)
    assert sharpness([torch.tensor([0.4, 0.4])]) == 0.0


def test_prompts_synonyms_and_background():
    p = build_prompts(VOC, "a clean origami {}.")
    assert p.foreground[14] == "a clean origami person with clothes, people, human."
    assert p.foreground[19] == "a clean origami tvmonitor, screen."
    assert len(p.background) == 25 and p.background[0] == "a clean origami ground."
    plain = build_prompts(VOC, "a photo of {}.", fuse_synonyms=False, use_background=False)
    assert plain.foreground[14] == "a photo of person." and plain.background == ()
    own = build_prompts(ClassSet(("circle", "star")), background=["noise"])
    assert own.background == ("a clean origami noise.",)
    with pytest.raises(ValueError, match="exactly one"):
        build_prompts(VOC, "no slot")

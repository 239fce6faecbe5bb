import math

import numpy as np
import pytest
import torch

from wsss_core.metrics import ConfusionMatrix


def reference_iou(preds, targets, n, ignore=255):
    """Independent: per-class set counting over all images, no confusion matrix."""
    inter = np.zeros(n)
    union = np.zeros(n)
    for p, t in zip(preds, targets, strict=True):
        keep = t != ignore
        p, t = p[keep], t[keep]
        for c in range(n):
            inter[c] += np.logical_and(p == c, t == c).sum()
            union[c] += np.logical_or(p == c, t == c).sum()
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def test_matches_independent_computation_over_a_split():
    rng = np.random.default_rng(0)
    n = 6
    preds, targets = [], []
    for _ in range(7):
        h, w = rng.integers(5, 30, size=2)
        t = rng.integers(0, n - 1, size=(h, w)).astype(np.uint8)  # class 5 never in target
        t[rng.random((h, w)) < 0.1] = 255
        p = np.where(rng.random((h, w)) < 0.6, t, rng.integers(0, n - 1, size=(h, w))).astype(np.uint8)
        p[p == 255] = 0
        preds.append(p)
        targets.append(t)
    cm = ConfusionMatrix(n)
    for p, t in zip(preds, targets, strict=True):
        cm.update(torch.from_numpy(p), t)  # tensors and arrays alike
    ref = reference_iou(preds, targets, n)
    np.testing.assert_allclose(cm.iou().numpy(), ref, rtol=1e-12, equal_nan=True)
    assert math.isnan(cm.iou()[5])
    assert cm.miou() == pytest.approx(np.nanmean(ref))


def test_merge_equals_single_accumulation():
    rng = np.random.default_rng(1)
    a, b, whole = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    for i in range(6):
        p, t = rng.integers(0, 4, size=(2, 10, 10))
        (a if i % 2 else b).update(p, t)
        whole.update(p, t)
    assert torch.equal(a.merge(b).matrix, whole.matrix)
    assert ConfusionMatrix.from_list(whole.to_list()).miou() == whole.miou()


def test_ignore_and_errors():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 2, 2]), np.array([0, 255, 2, 1]))
    assert cm.matrix.sum() == 3
    assert cm.iou()[0] == 1.0 and cm.iou()[1] == 0.0 and cm.iou()[2] == 0.5
    with pytest.raises(ValueError, match="sizes differ"):
        cm.update(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.zeros(2), np.array([0, 7]))
    with pytest.raises(ValueError, match="cannot merge"):
        cm.merge(ConfusionMatrix(4))

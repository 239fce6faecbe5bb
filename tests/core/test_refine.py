"""Sinkhorn, box masks and CAA against direct loop-based reference code."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from wsss_core.refine import box_mask, box_masks, caa, connected_components, sinkhorn


def sinkhorn_loop(w: np.ndarray, rounds: int) -> np.ndarray:
    d = w.astype(np.float64).copy()
    n = d.shape[0]
    for _ in range(rounds):
        for j in range(n):
            d[:, j] /= d[:, j].sum()
        for i in range(n):
            d[i, :] /= d[i, :].sum()
    return d


def box_mask_loop(cam: np.ndarray, thr: float) -> np.ndarray:
    fg = cam >= thr * cam.max()
    lab, n = ndimage.label(fg, structure=np.ones((3, 3)))
    out = np.zeros_like(fg)
    for c in range(1, n + 1):
        ys, xs = np.nonzero(lab == c)
        for y in range(ys.min(), ys.max() + 1):
            for x in range(xs.min(), xs.max() + 1):
                out[y, x] = True
    return out


def caa_loop(cams: np.ndarray, attn: np.ndarray, thr: float, t: int, rounds: int) -> np.ndarray:
    k, h, w = cams.shape
    n = h * w
    d = sinkhorn_loop(attn, rounds)
    a = (d + d.T) / 2
    at = np.eye(n)
    for _ in range(t):
        at = at @ a
    out = np.zeros((k, n))
    for c in range(k):
        b = box_mask_loop(cams[c], thr).reshape(-1)
        v = cams[c].reshape(-1)
        for i in range(n):
            out[c, i] = sum(at[i, j] * b[j] * v[j] for j in range(n))
        out[c] = (out[c] - out[c].min()) / (out[c].max() - out[c].min() + 1e-7)
    return out.reshape(k, h, w)


@pytest.mark.parametrize("rounds", [1, 3])
def test_sinkhorn_matches_loop_and_batches(rounds):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(3, 12, 12, generator=g, dtype=torch.float64) + 0.01
    out = sinkhorn(w, rounds)
    for b in range(3):
        np.testing.assert_allclose(out[b].numpy(), sinkhorn_loop(w[b].numpy(), rounds), rtol=1e-10)
    np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, rtol=1e-10)


def test_box_mask_separate_touching_and_diagonal_regions():
    cam = np.zeros((12, 14), np.float32)
    cam[1:3, 1:4] = 1.0  # region A
    cam[3, 4] = 0.9  # touches A only diagonally: same 8-connected region, widens A's box
    cam[8:11, 9:13] = 0.8  # region B, separate
    cam[6, 0] = 0.5  # below threshold 0.6: ignored
    got = box_mask(torch.from_numpy(cam), 0.6).numpy()
    expected = np.zeros_like(got)
    expected[1:4, 1:5] = True
    expected[8:11, 9:13] = True
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, box_mask_loop(cam, 0.6))


def test_box_masks_random_against_scipy():
    rng = np.random.default_rng(1)
    cams = rng.random((6, 9, 11)).astype(np.float32) ** 3
    got = box_masks(torch.from_numpy(cams), 0.4).numpy()
    for k in range(6):
        np.testing.assert_array_equal(got[k], box_mask_loop(cams[k], 0.4))
    lab = connected_components(torch.from_numpy(cams > 0.3))
    for k in range(6):
        ref, n = ndimage.label(cams[k] > 0.3, structure=np.ones((3, 3)))
        assert len(torch.unique(lab[k][lab[k] >= 0])) == n
        # same partition: pixels share a label iff scipy gives them one
        fg = ref > 0
        pairs = set(zip(ref[fg].tolist(), lab[k].numpy()[fg].tolist(), strict=True))
        assert len(pairs) == n


def test_box_mask_spiral_converges():
    """A long snake needs many propagation steps; the result must still be one region."""
    cam = np.zeros((9, 9), np.float32)
    cam[0, :] = cam[:, 8] = cam[8, :] = cam[2:, 0] = cam[2, :7] = cam[2:7, 6] = cam[6, 2:7] = 1
    lab = connected_components(torch.from_numpy(cam > 0)[None])
    assert len(torch.unique(lab[lab >= 0])) == ndimage.label(cam > 0, structure=np.ones((3, 3)))[1]


@pytest.mark.parametrize(("t", "rounds", "thr"), [(2, 3, 0.4), (1, 1, 0.7), (3, 2, 0.2)])
def test_caa_matches_loop(t, rounds, thr):
    rng = np.random.default_rng(2)
    h, w, k = 5, 6, 3
    cams = rng.random((k, h, w)) ** 2
    cams /= cams.reshape(k, -1).max(1)[:, None, None]
    attn = rng.random((h * w, h * w)) ** 4
    got = caa(torch.from_numpy(cams), torch.from_numpy(attn), box_threshold=thr, t=t, sinkhorn_rounds=rounds)
    assert got.shape == (k, h, w)
    np.testing.assert_allclose(got.numpy(), caa_loop(cams, attn, thr, t, rounds), atol=1e-5)

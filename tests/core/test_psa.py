"""PSA's science against direct loop references on small tensors: affinity labels, W_ij, the loss,
the random walk (dense and banded), AffinityNet."""

import numpy as np
import pytest
import torch

from wsss_core.losses.affinity import affinity_loss
from wsss_core.pairs import pair_affinity, radius_offsets
from wsss_core.refine.affinity_labels import affinity_labels, confident_regions
from wsss_core.refine.random_walk import dense_affinity, random_walk, random_walk_banded


def test_radius_offsets_are_psas_pairs_in_both_directions():
    offsets = radius_offsets(5)
    # PSA's search_dist (one direction): (0, 1..4) and (1..4, -4..4) with y² + x² < 25
    psa = [(0, x) for x in range(1, 5)] + [(y, x) for y in range(1, 5) for x in range(-4, 5) if x * x + y * y < 25]
    assert len(psa) == 34 and sorted(offsets) == sorted(psa + [(-y, -x) for y, x in psa])
    assert all(offsets[len(offsets) - 1 - i] == (-dy, -dx) for i, (dy, dx) in enumerate(offsets))


def test_confident_regions_against_a_pixel_loop():
    torch.manual_seed(0)
    cams, labels = torch.rand(2, 4, 5, 6), torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])
    got = confident_regions(cams, labels, 4.0, 32.0)
    for b in range(2):
        for y in range(5):
            for x in range(6):
                scores = [(cams[b, c, y, x].item(), c + 1) for c in range(4) if labels[b, c]]
                top, cls = max(scores)
                low, high = (1 - top) ** 4, (1 - top) ** 32
                want = cls if top > low else (0 if high >= top else 255)
                assert got[b, y, x].item() == want


def test_affinity_labels_pairs_within_the_radius():
    region = torch.tensor([[0, 0, 1, 1, 255], [0, 2, 2, 1, 1]])  # per pixel: bg, classes, ignored
    cams = torch.zeros(1, 2, 2, 5)
    cams[0, 0][region == 1] = 1.0
    cams[0, 1][region == 2] = 1.0
    cams[0, 0, 0, 4] = 0.1  # (1 − 0.1)^32 = 0.03 < 0.1 < (1 − 0.1)^4 = 0.66: neither sure -> ignored
    labels = torch.tensor([[1, 1]])
    assert torch.equal(confident_regions(cams, labels)[0], region)
    got = affinity_labels(cams, labels, radius=3)
    offsets = radius_offsets(3)
    for k, (dy, dx) in enumerate(offsets):
        for y in range(2):
            for x in range(5):
                yy, xx = y + dy, x + dx
                inside = 0 <= yy < 2 and 0 <= xx < 5
                a, b = region[y, x].item(), region[yy, xx].item() if inside else 255
                sure = a != 255 and b != 255
                assert got["bg_pos"][0, k, y, x].item() == (sure and a == b == 0)
                assert got["fg_pos"][0, k, y, x].item() == (sure and a == b != 0)
                assert got["neg"][0, k, y, x].item() == (sure and a != b)
    # a crop's padding takes part in no pair
    valid = torch.ones(1, 2, 5, dtype=torch.bool)
    valid[0, :, 0] = False
    padded = affinity_labels(cams, labels, radius=3, valid=valid)
    assert not any(padded[k][0, :, :, 0].any() for k in padded)


def test_pair_affinity_and_its_dense_matrix_against_a_loop():
    torch.manual_seed(1)
    f = torch.randn(2, 3, 4, 5)
    w = pair_affinity(f, radius=3)
    dense = dense_affinity(w, radius=3)
    for b in range(2):
        for i in range(20):
            for j in range(20):
                (yi, xi), (yj, xj) = divmod(i, 5), divmod(j, 5)
                d2 = (yi - yj) ** 2 + (xi - xj) ** 2
                want = 1.0 if i == j else (torch.exp(-(f[b, :, yi, xi] - f[b, :, yj, xj]).abs().mean()).item()
                                           if d2 < 9 else 0.0)
                assert dense[b, i, j].item() == pytest.approx(want, abs=1e-6)


def test_affinity_loss_against_its_formula():
    torch.manual_seed(2)
    w = torch.rand(1, 4, 3, 3) * 0.98 + 0.01
    labels = {k: torch.rand(1, 4, 3, 3) > 0.6 for k in ("bg_pos", "fg_pos", "neg")}
    terms = affinity_loss(w, labels)
    bg = -torch.log(w[labels["bg_pos"]] + 1e-5).mean()
    fg = -torch.log(w[labels["fg_pos"]] + 1e-5).mean()
    neg = -torch.log(1 + 1e-5 - w[labels["neg"]]).mean()
    for key, want in (("bg_pos", bg), ("fg_pos", fg), ("neg", neg), ("total", bg / 4 + fg / 4 + neg / 2)):
        assert terms[key].item() == pytest.approx(want.item(), rel=1e-4)
    none = affinity_loss(w, {k: torch.zeros_like(v) for k, v in labels.items()})
    assert none["total"].item() == 0.0


def reference_walk(cams: np.ndarray, aff: np.ndarray, beta: float, t: int) -> np.ndarray:
    """The textbook form: T = A^β with unit column sums, t plain matrix products."""
    trans = aff ** beta
    trans = trans / trans.sum(0, keepdims=True)
    m = cams.reshape(cams.shape[0], -1)
    for _ in range(t):
        m = m @ trans
    return m.reshape(cams.shape)


@pytest.mark.parametrize(("beta", "t"), [(8, 1), (8, 2), (4, 5), (8, 8), (2, 13), (1, 0)])
def test_random_walk_dense_and_banded_against_the_matrix_power(beta, t):
    torch.manual_seed(3)
    f = torch.randn(1, 6, 5, 6, dtype=torch.float64)
    cams = torch.rand(1, 3, 5, 6, dtype=torch.float64)
    w = pair_affinity(f, radius=3)
    dense = dense_affinity(w, radius=3)
    want = reference_walk(cams[0].numpy(), dense[0].numpy(), beta, t)
    np.testing.assert_allclose(random_walk(cams[0], dense[0], beta, t).numpy(), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(random_walk(cams, dense, beta, t)[0].numpy(), want, rtol=1e-9, atol=1e-12)  # batched
    np.testing.assert_allclose(random_walk_banded(cams, w, beta, t, radius=3)[0].numpy(), want, rtol=1e-9, atol=1e-12)
    # columns of T sum to 1: every pixel's new score is a weighted mean of scores, within the old range
    walked = random_walk(cams[0], dense[0], beta, t)
    assert (walked.amin((1, 2)) >= cams[0].amin((1, 2)) - 1e-12).all()
    assert (walked.amax((1, 2)) <= cams[0].amax((1, 2)) + 1e-12).all()
    assert torch.equal(walked, cams[0]) == (t == 0)


def test_psa_default_t_by_squaring_equals_256_steps():
    torch.manual_seed(4)
    f = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    cams = torch.rand(2, 4, 4, dtype=torch.float64)
    dense = dense_affinity(pair_affinity(f, radius=5), radius=5)[0]
    trans = dense.pow(8) / dense.pow(8).sum(0, keepdim=True)
    for _ in range(8):  # PSA: logt = 8 squarings
        trans = trans @ trans
    want = (cams.flatten(1) @ trans).view(cams.shape)
    torch.testing.assert_close(random_walk(cams, dense), want)
    torch.testing.assert_close(random_walk_banded(cams[None], pair_affinity(f, 5))[0], want)


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny_patch16_224", "open_clip:tiny"])
def test_affinitynet_features_and_affinity(backbone):
    from wsss_core.models import create_network, network_from_state

    torch.manual_seed(5)
    net = create_network("affinitynet", "none", backbone=backbone, depths=[-3, -2, -1], dims=[8, 8, 16],
                         output_stride=8, class_names=["background", "a", "b", "c"])
    pixels = torch.randn(2, 3, 64, 80)
    f = net(pixels)
    assert f.shape == (2, 32, 64 // net.stride, 80 // net.stride) and (f > -1).all()  # ELU
    w = net.affinity(pixels, radius=3)
    assert w.shape == (2, len(radius_offsets(3)), *f.shape[-2:]) and (w <= 1).all() and (w >= 0).all()
    terms = affinity_loss(w, affinity_labels(torch.rand(2, 3, *f.shape[-2:]), torch.tensor([[1, 0, 1], [0, 1, 0]]),
                                             radius=3))
    terms["total"].backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)  # DDP: every parameter in the loss
    again, names = network_from_state({"affinitynet": net.spec, "model": net.state_dict()})
    assert names == ["background", "a", "b", "c"]
    torch.testing.assert_close(again(pixels), net.eval()(pixels))


def test_affinitynet_input_scale_puts_a_vit_grid_at_stride_8():
    import torch.nn.functional as F

    from wsss_core.models import create_network, network_from_state
    from wsss_core.models.affinitynet import create_affinitynet

    torch.manual_seed(7)
    net = create_network("affinitynet", "none", backbone="open_clip:tiny", depths=[-3, -2, -1], dims=[4, 4, 8],
                         output_stride=8, input_scale=2.0, class_names=["background", "a"]).eval()
    pixels = torch.randn(1, 3, 64, 96)
    f = net(pixels)
    assert net.stride == 8 and f.shape[-2:] == (8, 12)  # a patch-16 tower on 8-pixel cells
    # the same network at scale 1 reading the 2× image itself
    plain = create_affinitynet("open_clip:tiny", pretrained="none", dims=(4, 4, 8)).eval()
    plain.load_state_dict(net.state_dict())
    up = F.interpolate(pixels, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(f, plain(up))
    again, _ = network_from_state({"affinitynet": net.spec, "model": net.state_dict()}, "affinitynet")
    assert again.input_scale == 2 and again.stride == 8
    torch.testing.assert_close(again(pixels), f)
    old = {k: v for k, v in net.spec.items() if k != "input_scale"}  # a checkpoint from before the option
    assert network_from_state({"affinitynet": old, "model": net.state_dict()})[0].input_scale == 1


def test_random_walk_refiner_on_probabilities():
    import torch.nn.functional as F

    from wsss_core.models import create_network
    from wsss_core.pipeline import PseudoMasker
    from wsss_core.registry import create_refiner
    from wsss_core.types import CamOutput

    torch.manual_seed(6)
    net = create_network("affinitynet", "none", backbone="open_clip:tiny", depths=[-3, -2, -1], dims=[4, 4, 8],
                         output_stride=8, class_names=["background", "a", "b"])
    state = {"affinitynet": net.spec, "model": net.state_dict()}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    probs = [torch.rand(3, 40, 56), torch.rand(2, 40, 56)]
    walk = create_refiner("random_walk", checkpoint=state, beta=4, t=3, radius=3, form="banded")
    got = walk(probs, [{}, {}], images)
    for image, p, out in zip(images, probs, got, strict=True):
        x = torch.from_numpy(image)[None]
        pairs = net.eval().affinity(net.normalize(x), 3)[0].detach()
        scores = torch.cat([(1 - p[1:].amax(0, keepdim=True)) ** 16, p[1:]])  # PSA's background, alpha 16
        m = F.adaptive_avg_pool2d(scores[None], pairs.shape[-2:])[0]
        walked = reference_walk(m.double().numpy(), dense_affinity(pairs[None].double(), 3)[0].numpy(), 4, 3)
        want = F.interpolate(torch.from_numpy(walked)[None].float(), size=(40, 56), mode="bilinear",
                             align_corners=False)[0]
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    # the dense form (auto picks it for a grid this small), and a cached affinity in aux (no network pass)
    for form in ("dense", "auto"):
        dense = create_refiner("random_walk", checkpoint=state, beta=4, t=3, radius=3, form=form)
        for a, b in zip(dense(probs, [{}, {}], images), got, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    cached = [{"affinity": a} for a in walk.affinity(images[:1])] + [{"affinity": walk.affinity(images[1:])[0]}]
    walk.net = None  # no network left to run
    for a, b in zip(walk(probs, cached), got, strict=True):
        torch.testing.assert_close(a, b)
    # in the pipeline after the background rule, with alpha=None walking that background
    plain = create_refiner("random_walk", checkpoint=state, t=2, radius=3, alpha=None)
    masker = PseudoMasker([plain], bg_rule="threshold", bg_value=0.4)
    out = CamOutput([2, 5], torch.rand(2, 3, 4), torch.tensor([0.6, 0.4]))
    res = masker([out], [(40, 56)], images[:1])[0]
    assert res.mask.shape == (40, 56) and set(res.mask.unique().tolist()) <= {0, 2, 5}
    with pytest.raises(ValueError, match="t must be ≥ 0 and beta > 0"):
        create_refiner("random_walk", checkpoint=state, t=-1)

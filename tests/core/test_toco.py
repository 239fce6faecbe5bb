"""ToCo's losses and PAR against direct loop references on small tensors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.cams import toco_cam
from wsss_core.losses import (
    balanced_seg_loss,
    ctc_loss,
    pair_labels,
    ptc_loss,
    roi_crops,
    roi_map,
    token_labels_from_cam,
)
from wsss_core.models.toco import class_activation
from wsss_core.refine import PAR, par
from wsss_core.registry import REFINERS


def test_token_labels_from_cam_thresholds_present_classes_and_valid_box():
    g = torch.Generator().manual_seed(0)
    cam = torch.rand(2, 4, 5, 6, generator=g)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]])
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[1, :, 4:] = False
    got = token_labels_from_cam(cam, labels, high=0.7, low=0.25, valid=valid)
    for b in range(2):
        for y in range(5):
            for x in range(6):
                scores = [(cam[b, c, y, x].item(), c) for c in range(4) if labels[b, c]]
                v, c = max(scores)
                want = c + 1 if v > 0.7 else (0 if v <= 0.25 else 255)
                want = want if valid[b, y, x] else 255
                assert got[b, y, x].item() == want


def test_pair_labels_skip_uncertain_tokens_and_the_diagonal():
    t = torch.tensor([[0, 2, 255, 2], [1, 1, 0, 255]])
    got = pair_labels(t)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if i == j or 255 in (t[b, i].item(), t[b, j].item()):
                    assert got[b, i, j] == 255
                else:
                    assert got[b, i, j] == int(t[b, i] == t[b, j])


def _ptc_reference(tokens, labels):
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            for j in range(tokens.shape[1]):
                li, lj = labels[b, i].item(), labels[b, j].item()
                if i == j or 255 in (li, lj):
                    continue
                c = abs(F.cosine_similarity(tokens[b, i], tokens[b, j], dim=0).item())
                if li == lj:
                    pos_sum, n_pos = pos_sum + c, n_pos + 1
                else:
                    neg_sum, n_neg = neg_sum + c, n_neg + 1
    return 0.5 * (1 - pos_sum / (n_pos + 1)) + 0.5 * neg_sum / (n_neg + 1)


def test_ptc_loss_matches_the_pairwise_reference_and_has_gradients():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 9, 5, generator=g, requires_grad=True)
    labels = torch.tensor([[0, 0, 1, 1, 255, 3, 3, 0, 255], [2, 2, 2, 0, 0, 255, 255, 255, 1]])
    loss = ptc_loss(tokens, labels)
    assert loss.item() == pytest.approx(_ptc_reference(tokens.detach(), labels), abs=1e-5)
    loss.backward()
    assert tokens.grad is not None and tokens.grad[0, 4].abs().sum() == 0  # an uncertain token takes no part
    # All tokens alike and all one label: the loss is 0.5 · (1 − n/(n+1)); all uncertain: 0.5.
    same = torch.ones(1, 4, 3)
    assert ptc_loss(same, torch.zeros(1, 4, dtype=torch.long)).item() == pytest.approx(0.5 * (1 - 12 / 13))
    assert ptc_loss(same, torch.full((1, 4), 255)).item() == pytest.approx(0.5)


def test_balanced_seg_loss_is_the_mean_of_the_background_and_foreground_cross_entropies():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, 5, generator=g)
    mask = torch.randint(0, 4, (2, 6, 5), generator=g)
    mask[0, :2] = 255
    bg = torch.where(mask == 0, mask, torch.full_like(mask, 255))
    fg = torch.where(mask != 0, mask, torch.full_like(mask, 255))
    want = 0.5 * (F.cross_entropy(logits, bg, ignore_index=255) + F.cross_entropy(logits, fg, ignore_index=255))
    assert balanced_seg_loss(logits, mask).item() == pytest.approx(want.item(), rel=1e-5)
    only_fg = torch.ones(2, 6, 5, dtype=torch.long)  # no background pixel: no NaN, the fg term halved
    got = balanced_seg_loss(logits, only_fg)
    assert torch.isfinite(got) and got.item() == pytest.approx(0.5 * F.cross_entropy(logits, only_fg).item(), rel=1e-5)


def _par_reference(image, maps, dilations, iterations, w1=0.3, w2=0.01):
    """PAR pixel by pixel: numpy loops over pixels and neighbours."""
    img = image[0].numpy().astype(np.float64)  # [3, H, W]
    _, h, w = img.shape
    m = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=True)[0].numpy().astype(np.float64)
    offs = [(dy * d, dx * d, d * (math.sqrt(2) if dy and dx else 1.0)) for d in dilations
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))]
    dist = np.array([o[2] for o in offs])
    near = np.exp(-(dist / (dist.std(ddof=1) + 1e-8) / w1) ** 2)
    near /= near.sum()
    at = lambda a, y, x: a[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]  # noqa: E731
    aff = np.zeros((len(offs), h, w))
    for y in range(h):
        for x in range(w):
            nb = np.stack([at(img, y + oy, x + ox) for oy, ox, _ in offs], axis=1)  # [3, n]
            std = nb.std(axis=1, ddof=1, keepdims=True)
            e = (-((np.abs(nb - img[:, y, x, None]) / (std + 1e-8) / w1) ** 2)).mean(axis=0)
            aff[:, y, x] = np.exp(e - e.max()) / np.exp(e - e.max()).sum() + w2 * near
    for _ in range(iterations):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                new[:, y, x] = sum(aff[n, y, x] * at(m, y + oy, x + ox) for n, (oy, ox, _) in enumerate(offs))
        m = new
    return torch.from_numpy(m)


def test_par_matches_the_pixel_loop_reference():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 7, 9, generator=g) * 255
    maps = torch.rand(1, 3, 4, 5, generator=g)
    got = par(image, maps, dilations=(1, 2, 3), iterations=3)
    assert got.shape == (1, 3, 7, 9)
    torch.testing.assert_close(got[0].double(), _par_reference(image, maps, (1, 2, 3), 3), rtol=1e-4, atol=1e-5)


def test_par_follows_colour_edges_and_the_refiner_keeps_the_scale():
    image = np.zeros((12, 12, 3), np.uint8)
    image[:, 6:] = 200  # two flat halves
    scores = torch.zeros(2, 12, 12)
    scores[0], scores[1, :, 4:8] = 0.5, 1.0  # a class blob straddling the edge; background 0.5
    out = REFINERS.get("par")()([scores], [{}], [image])[0]
    assert out.shape == (2, 12, 12)
    # Scores move along colour, not across the edge: inside each half they even out.
    left, right = out[1, :, :6], out[1, :, 6:]
    assert left.std() < scores[1, :, :6].std() and right.std() < scores[1, :, 6:].std()
    # Constant scores stay what they were (the refiner divides out PAR's (1 + w2)^iterations).
    flat = REFINERS.get("par")()([torch.full((2, 12, 12), 0.3)], [{}], [image])[0]
    torch.testing.assert_close(flat, torch.full((2, 12, 12), 0.3))
    assert isinstance(REFINERS.get("par")(), PAR)


def test_class_activation_is_the_classifier_conv_on_every_token():
    g = torch.Generator().manual_seed(4)
    tokens, weight = torch.randn(2, 5, 3, 4, generator=g), torch.randn(6, 5, 1, 1, generator=g)
    want = F.conv2d(tokens, weight).relu()
    torch.testing.assert_close(class_activation(tokens, weight), want)
    torch.testing.assert_close(class_activation(tokens, weight.flatten(1)), want)


def test_toco_cam_multi_scale_flip_matches_the_loop_reference():
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(3, 3, 1, 1, generator=g)

    def cam_fn(x):  # a stride-4 "network" whose CAM is not flip-symmetric
        f = F.conv2d(F.avg_pool2d(x, 4, ceil_mode=True), proj)
        return f + torch.linspace(0, 1, f.shape[-1])

    pixels = torch.randn(2, 3, 16, 20, generator=g)
    got = toco_cam(cam_fn, pixels, scales=(1.0, 0.5, 1.5), flip=True)
    for b in range(2):
        total = torch.zeros(3, 16, 20)
        for s in (1.0, 0.5, 1.5):
            x = pixels[b:b + 1] if s == 1 else F.interpolate(pixels[b:b + 1], size=(int(16 * s), int(20 * s)),
                                                             mode="bilinear", align_corners=False)
            a = F.interpolate(cam_fn(x), size=(16, 20), mode="bilinear", align_corners=False)[0]
            f = F.interpolate(cam_fn(x.flip(-1)), size=(16, 20), mode="bilinear", align_corners=False)[0].flip(-1)
            total += torch.maximum(a, f).relu()
        for c in range(3):
            t = total[c] - total[c].min()
            torch.testing.assert_close(got[b, c], t / (t.max() + 1e-5), rtol=1e-4, atol=1e-5)
    assert got.min() >= 0 and got.max() < 1
    # the caller's own scale-1 CAM stands in for that pass; a wrong one shows
    torch.testing.assert_close(toco_cam(cam_fn, pixels, (1.0, 0.5, 1.5), flip=True, known=cam_fn(pixels)), got)
    assert not torch.allclose(toco_cam(cam_fn, pixels, (1.0, 0.5, 1.5), flip=True, known=cam_fn(pixels) + 1), got)


def _ctc_reference(student, teacher, flags, temp):
    total = 0.0
    for b in range(student.shape[0]):
        s = torch.exp(teacher[b] @ student[b].T / temp)  # [2, n]
        neg = s[:, flags[b] == 0].sum(dim=1)
        loss = torch.zeros(2)
        for j in torch.nonzero(flags[b])[:, 0]:
            loss += -torch.log(s[:, j] / (s[:, j] + neg + 1e-4))
        loss += -torch.log(1 / (1 + neg + 1e-4))
        total += loss.sum() / 2 / (flags[b].sum() + 1e-4)
    return total / student.shape[0]


def test_ctc_loss_matches_the_per_crop_reference():
    g = torch.Generator().manual_seed(6)
    student = F.normalize(torch.randn(3, 6, 8, generator=g), dim=-1)
    teacher = F.normalize(torch.randn(3, 2, 8, generator=g), dim=-1)
    flags = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float)
    got = ctc_loss(student, teacher, flags, temp=0.5)
    assert got.item() == pytest.approx(_ctc_reference(student, teacher, flags, 0.5).item(), rel=1e-5)
    # Positive crops drawn to the teacher's views lower the loss; negative ones raise it.
    pull = 2 * teacher.mean(1, keepdim=True)
    positives = F.normalize(student + pull * flags[..., None], dim=-1)
    negatives = F.normalize(student + pull * (1 - flags[..., None]), dim=-1)
    assert ctc_loss(positives, teacher, flags) < got < ctc_loss(negatives, teacher, flags)


def test_roi_map_and_roi_crops():
    cam = torch.zeros(2, 3, 40, 40)
    cam[:, 1, :, 20:] = 0.9  # confident foreground on the right half
    cam[:, 2, :, :10] = 0.5  # uncertain on the left strip, absent in image 1
    labels = torch.tensor([[0, 1, 1], [0, 1, 0]])
    roi = roi_map(cam, labels, high=0.7, low=0.25)
    assert roi[0, 0, 0] == 1 and roi[0, 0, 15] == 0 and roi[0, 0, 30] == 2
    assert roi[1, 0, 0] == 0  # class 3 is absent in image 1
    images = torch.arange(2 * 3 * 40 * 40, dtype=torch.float).view(2, 3, 40, 40)
    crops, flags = roi_crops(images, roi, num=5, size=16, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (2, 5, 3, 16, 16) and flags.shape == (2, 5)
    for b in range(2):
        for n in range(5):
            y0, x0 = divmod(int(crops[b, n, 0, 0, 0].item()) - b * 3 * 1600, 40)
            torch.testing.assert_close(crops[b, n], images[b, :, y0:y0 + 16, x0:x0 + 16])
            assert roi[b, y0 + 8, x0 + 8] <= 1  # centred off confident foreground
            assert flags[b, n] == float(roi[b, y0:y0 + 16, x0:x0 + 16].sum() > 0.2 * 256)


def test_dense_energy_loss_value_and_gradient_against_pairwise_loops():
    from wsss_core.losses.energy import dense_energy_loss

    g = torch.Generator().manual_seed(8)
    b, k, h, w = 2, 3, 4, 5
    images = torch.rand(b, 3, h, w, generator=g) * 255
    probs = torch.rand(b, k, h, w, generator=g).softmax(1).requires_grad_(True)
    roi = torch.ones(b, h, w)
    roi[1, :, 4] = 0  # crop padding
    labels = torch.randint(0, 3, (b, h, w), generator=g)
    labels[0, 0] = 255
    loss = dense_energy_loss(images, probs, roi, labels, sigma_rgb=40.0, sigma_xy=3.0, scale=1.0, chunk=7)
    loss.backward()
    value, grad = 0.0, torch.zeros(b, k, h, w)
    for n in range(b):
        s = probs.detach()[n] * roi[n]
        gate = torch.where(labels[n] == 255, torch.ones(h, w), roi[n] - probs.detach()[n].amax(0)).clamp_min(0)
        ws = torch.zeros(k, h, w)
        for y in range(h):
            for x in range(w):
                for yy in range(h):
                    for xx in range(w):
                        d = ((y - yy) ** 2 + (x - xx) ** 2) / 9.0 + ((images[n, :, y, x] - images[n, :, yy, xx]) ** 2).sum() / 1600.0
                        ws[:, y, x] += math.exp(-0.5 * d) * s[:, yy, xx]
        value -= (s * gate * ws).sum().item() / b
        grad[n] = -2 * gate * ws * roi[n] / b
    assert loss.item() == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(probs.grad, grad, rtol=1e-4, atol=1e-6)

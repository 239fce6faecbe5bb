"""The segmenter, its loss (CGL) and inference, against direct reference code."""

import pytest
import torch
import torch.nn.functional as F

from wsss_core.inference import predict_probs
from wsss_core.losses import cgl_loss
from wsss_core.masks import confidence
from wsss_core.models.segmenter import create_segmenter


def reference_cgl(logits, mask, conf, mu):
    total, count = 0.0, 0
    logp = logits.log_softmax(1)
    for b in range(mask.shape[0]):
        for y in range(mask.shape[1]):
            for x in range(mask.shape[2]):
                if mask[b, y, x] != 255 and conf[b, y, x] >= mu:
                    total = total - logp[b, mask[b, y, x], y, x]
                    count += 1
    return total / max(count, 1)


def test_cgl_loss_against_a_pixel_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    mask = torch.randint(0, 4, (2, 5, 6), generator=g)
    mask[0, :2] = 255
    conf = torch.rand(2, 5, 6, generator=g)
    for mu in (0.0, 0.3, 0.95):
        torch.testing.assert_close(cgl_loss(logits, mask, conf, mu), torch.as_tensor(reference_cgl(logits, mask, conf, mu)))
    torch.testing.assert_close(cgl_loss(logits, mask, conf, 0.0), F.cross_entropy(logits, mask, ignore_index=255))


def test_cgl_loss_with_nothing_left_is_zero_with_zero_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = cgl_loss(logits, torch.full((1, 4, 4), 255), torch.ones(1, 4, 4), 0.5)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    loss = cgl_loss(logits, torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4), 0.5)  # none confident
    assert loss.item() == 0


def test_confidence_batched_equals_per_image():
    scores = torch.rand(3, 2, 5, 5)
    batched = confidence(scores)
    for i in range(3):
        peak = scores[i].amax(0)
        torch.testing.assert_close(batched[i], torch.maximum(1 - peak, peak))


@pytest.mark.parametrize("backbone, head", [
    ("resnet18", "aspp"), ("resnet18", "largefov"), ("vit_tiny_patch16_224", "largefov"), ("open_clip:tiny", "aspp"),
])
def test_segmenter_logits_match_odd_input_sizes(backbone, head):
    model = create_segmenter(backbone, 11, "none", head=head, output_stride=8)
    images = torch.randint(0, 256, (2, 97, 131, 3), dtype=torch.uint8)
    logits = model(model.normalize(images))
    assert logits.shape == (2, 11, 97, 131)
    F.cross_entropy(logits, torch.randint(0, 11, (2, 97, 131))).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    groups = model.param_groups(0.01)
    assert groups[1]["lr"] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_multiscale_flip_inference():
    model = create_segmenter("resnet18", 5, "none").eval()
    pixels = torch.randn(1, 3, 64, 80)
    single = predict_probs(model, pixels)
    torch.testing.assert_close(single, model(pixels).softmax(1))
    multi = predict_probs(model, pixels, scales=(0.5, 1.0, 1.5), flip=True)
    assert multi.shape == (1, 5, 64, 80)
    torch.testing.assert_close(multi.sum(1), torch.ones(1, 64, 80))
    mirrored = predict_probs(model, pixels.flip(-1), scales=(0.5, 1.0, 1.5), flip=True).flip(-1)
    torch.testing.assert_close(multi, mirrored, atol=1e-5, rtol=0)  # flip-averaged: mirror-equivariant


def test_augmentation_moves_image_mask_and_confidence_together():
    import numpy as np

    from wsss_core.augment import random_scale_crop_flip

    rng = np.random.default_rng(0)
    h, w = 37, 53
    code = (np.arange(h)[:, None] * w + np.arange(w)[None]) % 250  # every pixel its own value
    image = np.repeat(code[..., None], 3, -1).astype(np.uint8)
    mask, conf = code.astype(np.uint8), (code + 1).astype(np.uint8)
    for _ in range(20):
        im, m, c = random_scale_crop_flip(image, mask, conf, 32, (0.5, 1.5), rng)
        assert im.shape == (32, 32, 3) and m.shape == c.shape == (32, 32)
        real = m != 255
        assert real.any() and (c[~real] == 0).all()  # padding: ignored, zero confidence
        assert np.array_equal(c[real], m[real] + 1)  # both nearest: the same pixels
    im, m, c = random_scale_crop_flip(image, mask, conf, 32, (1.0, 1.0), rng)  # no rescale: the image too
    assert np.array_equal(im[..., 0][m != 255], m[m != 255])


def test_random_resized_crop_and_colour_jitter():
    import numpy as np
    from PIL import Image

    from wsss_core.augment import color_jitter, random_resized_crop

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    # a box of the whole area on a square image: every aspect but 1 is out of bounds, so the fallback (all of it)
    whole = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC))
    assert np.array_equal(random_resized_crop(image, 16, (1.0, 1.0), rng, ratio=(2.0, 3.0)), whole)
    # a box of at most a quarter of the area of a 40×80 image with a 4 px black frame: some miss the frame, some not
    framed = np.zeros((40, 80, 3), np.uint8)
    framed[4:36, 4:76] = 200
    views = [random_resized_crop(framed, 24, (0.05, 0.25), rng) for _ in range(20)]
    assert all(v.shape == (24, 24, 3) and v.dtype == np.uint8 for v in views)
    assert any((v == 200).all() for v in views) and any((v == 0).any() for v in views)
    assert np.array_equal(color_jitter(image, rng, p=0.0, grayscale=0.0), image)  # geometry and pixels kept
    grey = color_jitter(image, rng, p=0.0, grayscale=1.0)
    assert grey.shape == image.shape and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    jittered = [color_jitter(image, rng, p=1.0, grayscale=0.0) for _ in range(4)]
    assert all(j.shape == image.shape and not np.array_equal(j, image) for j in jittered)

"""Training-time augmentation: random scale, random crop (padded), horizontal flip for segmentation;
the random resized crop and colour jitter of ToCo's contrastive views.

The image, its label mask and the per-pixel confidence move together; padding is 0 for the image
and the confidence and 255 (ignore) for the mask, so padded pixels never train the model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from wsss_core.masks import IGNORE


def random_scale_crop_flip(image: np.ndarray, mask: np.ndarray, conf: np.ndarray, crop: int,
                           scale_range: tuple[float, float], rng: np.random.Generator,
                           flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random view of a training sample.

    Args:
        image: uint8 [H, W, 3]; mask: uint8 [H, W] (255 = ignore); conf: uint8 [H, W].
        crop: side of the square crop; scale_range: (low, high) of the random rescale.

    Returns:
        image uint8 [crop, crop, 3], mask uint8 [crop, crop], conf uint8 [crop, crop].
    """
    s = rng.uniform(*scale_range)
    h, w = mask.shape
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if size != (w, h):
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
        conf = np.asarray(Image.fromarray(conf).resize(size, Image.NEAREST))
    h, w = mask.shape
    out_img = np.zeros((crop, crop, 3), np.uint8)
    out_mask = np.full((crop, crop), IGNORE, np.uint8)
    out_conf = np.zeros((crop, crop), np.uint8)
    y0, x0 = rng.integers(0, max(h - crop, 0) + 1), rng.integers(0, max(w - crop, 0) + 1)  # crop start
    py, px = rng.integers(0, max(crop - h, 0) + 1), rng.integers(0, max(crop - w, 0) + 1)  # paste offset
    ch, cw = min(crop, h), min(crop, w)
    out_img[py:py + ch, px:px + cw] = image[y0:y0 + ch, x0:x0 + cw]
    out_mask[py:py + ch, px:px + cw] = mask[y0:y0 + ch, x0:x0 + cw]
    out_conf[py:py + ch, px:px + cw] = conf[y0:y0 + ch, x0:x0 + cw]
    if flip and rng.random() < 0.5:
        out_img, out_mask, out_conf = out_img[:, ::-1], out_mask[:, ::-1], out_conf[:, ::-1]
    return np.ascontiguousarray(out_img), np.ascontiguousarray(out_mask), np.ascontiguousarray(out_conf)


def random_resized_crop(image: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A random box of ``scale`` × the image's area and aspect ratio in ``ratio``, resized to size².

    The second global view of ToCo's class-token contrast (DINO's ``RandomResizedCrop``): a view of
    the whole image that shares only part of its content with the training crop.

    Args:
        image: uint8 [H, W, 3].

    Returns:
        uint8 [size, size, 3].
    """
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        bw, bh = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < bw <= w and 0 < bh <= h:
            break
    else:  # torchvision's fallback: the largest centred box
        bh, bw = h, w
    y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    box = Image.fromarray(image[y0:y0 + bh, x0:x0 + bw])
    return np.asarray(box.resize((size, size), Image.BICUBIC))


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, p: float = 0.8, grayscale: float = 0.2) -> np.ndarray:
    """DINO's photometric view: with probability ``p`` brightness, contrast, saturation and hue
    jittered by factors in [1 − x, 1 + x] (hue: a shift in [−hue, hue] turns), then grey with
    probability ``grayscale``. Geometry is untouched, so CAM-derived regions stay aligned.

    Args:
        image: uint8 [H, W, 3].

    Returns:
        uint8 [H, W, 3].
    """
    from PIL import ImageEnhance

    im = Image.fromarray(image)
    if rng.random() < p:
        ops = [(ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast), (ImageEnhance.Color, saturation)]
        for i in rng.permutation(len(ops) + 1):
            if i < len(ops):
                enhance, x = ops[i]
                im = enhance(im).enhance(rng.uniform(1 - x, 1 + x))
            else:
                h, s, v = im.convert("HSV").split()
                shift = round(rng.uniform(-hue, hue) * 255)
                h = h.point([(k + shift) % 256 for k in range(256)])
                im = Image.merge("HSV", (h, s, v)).convert("RGB")
    if rng.random() < grayscale:
        im = im.convert("L").convert("RGB")
    return np.asarray(im)

"""Training-time augmentation for segmentation: random scale, random crop (padded), horizontal flip.

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

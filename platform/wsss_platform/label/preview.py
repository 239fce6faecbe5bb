"""A preview grid for MLflow: image | CAM (max over classes) | pseudo mask | ground truth."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from wsss_core.classes import voc_palette


def heatmap(cam: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> uint8 [h, w, 3], a blue-to-red ramp."""
    c = np.clip(cam, 0, 1)
    r = np.clip(1.5 - np.abs(4 * c - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * c - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * c - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]], cell: int = 160) -> bytes:
    """PNG bytes of one row per image: (image [H,W,3], cam [h,w], mask [H,W], gt [H,W] or None)."""
    pal = voc_palette()
    tiles = []
    for image, cam, mask, gt in rows:
        h, w = image.shape[:2]
        scale = cell / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        cells = [Image.fromarray(image).resize(size, Image.BILINEAR),
                 Image.fromarray(heatmap(cam)).resize(size, Image.BILINEAR),
                 Image.fromarray(pal[mask]).resize(size, Image.NEAREST),
                 Image.fromarray(pal[gt] if gt is not None and gt.size else np.zeros((h, w, 3), np.uint8)).resize(size, Image.NEAREST)]
        row = Image.new("RGB", (4 * cell, cell), (32, 32, 32))
        for j, c in enumerate(cells):
            row.paste(c, (j * cell, 0))
        tiles.append(row)
    out = Image.new("RGB", (4 * cell, cell * max(1, len(tiles))), (32, 32, 32))
    for i, t in enumerate(tiles):
        out.paste(t, (0, i * cell))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()

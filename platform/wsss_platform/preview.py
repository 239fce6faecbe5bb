"""Pictures for MLflow: a titled preview grid and a per-class IoU chart.

Labeling preview: one row per image, titled with its id and present classes: image | the CAM of
each present class | the regions a refiner voted into, when one did | pseudo mask | ground truth. ``panels`` draws any such grid (the segmenter's:
image | prediction | pseudo mask | ground truth).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from wsss_core.classes import voc_palette

BG = (32, 32, 32)
FG = (235, 235, 235)


def heatmap(cam: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> uint8 [h, w, 3], a blue-to-red ramp."""
    c = np.clip(cam, 0, 1)
    r = np.clip(1.5 - np.abs(4 * c - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * c - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * c - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


@dataclass
class PreviewRow:
    image_id: str
    image: np.ndarray
    """uint8 [H, W, 3]"""
    cams: np.ndarray
    """[K, h, w] in [0, 1], one per present class"""
    class_names: list[str]
    """the K present classes"""
    mask: np.ndarray
    """uint8 [H, W] pseudo mask (255 = ignore)"""
    gt: np.ndarray | None
    """uint8 [H, W] ground truth, when there is one"""
    regions: np.ndarray | None = None
    """int [L, H, W] region ids (-1 none; ``wsss_core.regions``) of a refiner that votes into regions"""


def outline(image: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """``image`` [H, W, 3] with the edges of every region of ``layers`` [L, H, W] drawn in white."""
    edge = np.zeros(image.shape[:2], bool)
    for ids in layers:
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    out = image.copy()
    out[edge] = 255
    return out


def _cell(array: np.ndarray, size: tuple[int, int], nearest: bool) -> Image.Image:
    return Image.fromarray(array).resize(size, Image.NEAREST if nearest else Image.BILINEAR)


Cell = tuple[str, np.ndarray | None, bool]
"""(label, uint8 [H, W, 3] picture or None for an empty cell, nearest-neighbour resize)"""


def panels(rows: list[tuple[str, list[Cell]]], cell: int = 160, title_h: int = 16) -> bytes:
    """PNG bytes of a grid: one titled row of labelled pictures per (title, cells)."""
    cols = max((len(cells) for _, cells in rows), default=1) or 1
    height = cell + 2 * title_h
    out = Image.new("RGB", (cols * cell, height * max(1, len(rows))), BG)
    draw = ImageDraw.Draw(out)
    for i, (title, cells) in enumerate(rows):
        y = i * height
        draw.text((4, y + 2), title, fill=FG)
        for j, (label, picture, nearest) in enumerate(cells):
            if picture is None:
                continue
            h, w = picture.shape[:2]
            scale = cell / max(h, w)
            out.paste(_cell(picture, (max(1, round(w * scale)), max(1, round(h * scale))), nearest), (j * cell, y + title_h))
            draw.text((j * cell + 4, y + title_h + cell + 2), label, fill=FG)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def colour(mask: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """uint8 [H, W] labels (255 = ignore) -> VOC colours; black when there is no mask."""
    if mask is None or not mask.size:
        return np.zeros((*like.shape[:2], 3), np.uint8)
    return voc_palette()[mask]


def grid(rows: list[PreviewRow], cell: int = 160, title_h: int = 16) -> bytes:
    """PNG bytes of the labeling preview: image | CAM per present class | [regions] | pseudo mask | ground truth."""
    k_max = max((len(r.class_names) for r in rows), default=1) or 1
    out = []
    for r in rows:
        cells: list[Cell] = [("image", r.image, False)]
        cells += [(f"CAM {n}", heatmap(c), False) for n, c in zip(r.class_names, r.cams, strict=True)]
        cells += [("", None, False)] * (k_max - len(r.class_names))
        if r.regions is not None:
            cells.append((f"{int(r.regions.max()) + 1} regions", outline(r.image, r.regions), True))
        cells += [("pseudo mask", colour(r.mask, r.image), True), ("ground truth", colour(r.gt, r.image), True)]
        out.append((f"{r.image_id}: {', '.join(r.class_names) or 'no class'}", cells))
    return panels(out, cell, title_h)


def iou_chart(iou: dict[str, float], iou_raw: dict[str, float], title: str) -> bytes:
    """PNG bytes of a horizontal bar chart: per class, refined and raw-CAM IoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in iou if iou[k] == iou[k] or iou_raw.get(k, float("nan")) == iou_raw.get(k, float("nan"))]
    ref = [iou[k] if iou[k] == iou[k] else 0.0 for k in names]
    raw = [iou_raw.get(k, 0.0) if iou_raw.get(k, 0.0) == iou_raw.get(k, 0.0) else 0.0 for k in names]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
    ax.barh(y - 0.2, raw, height=0.4, label="raw CAM", color="#9bb7d4")
    ax.barh(y + 0.2, ref, height=0.4, label="refined", color="#1f5fa8")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

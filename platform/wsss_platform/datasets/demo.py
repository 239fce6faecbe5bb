"""Synthetic scene datasets with exact ground truth, written in the real VOC and COCO formats.

Scenes hold 1-4 shapes from ten classes on a textured background; colour and texture are random
per object, so only shape identifies a class. Objects vary in size and rotation and occlude each
other, and an object keeps its label only while enough of it stays visible, so image-level labels,
XML objects, COCO annotations and masks always agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from wsss_platform import storage
from wsss_platform.datasets.base import encode_grey_png, encode_jpeg, encode_mask_png
from wsss_platform.storage import StorageOptions

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond", "crescent", "arrow",
)  # fmt: skip
POLYGONS = {"square", "triangle", "star", "cross", "hexagon", "diamond", "arrow"}
SIZES: tuple[tuple[int, int], ...] = ((224, 224), (224, 288), (288, 224), (256, 320), (192, 256))
MIN_VISIBLE = 150  # pixels; an object occluded below this is dropped from the scene


@dataclass
class SceneObject:
    label: int  # 1-based index into SHAPES
    mask: np.ndarray  # bool [H, W], the full (unoccluded) object
    polygon: list[float] | None  # COCO polygon [x0, y0, x1, y1, ...] for polygonal shapes


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # uint8 [H, W]
    objects: list[SceneObject]
    visible: list[np.ndarray]  # bool [H, W] per object, what is left after occlusion

    @property
    def labels(self) -> list[int]:
        return sorted({o.label for o in self.objects})


def _polygon_vertices(shape: str, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    k = np.arange
    if shape == "square":
        ang, rad = np.pi / 4 + k(4) * np.pi / 2, np.full(4, r)
    elif shape == "triangle":
        ang, rad = -np.pi / 2 + k(3) * 2 * np.pi / 3, np.full(3, r)
    elif shape == "hexagon":
        ang, rad = k(6) * np.pi / 3, np.full(6, r)
    elif shape == "star":
        ang, rad = -np.pi / 2 + k(10) * np.pi / 5, np.where(k(10) % 2 == 0, r, 0.42 * r)
    elif shape == "diamond":
        pts = np.array([[0, -r], [0.55 * r, 0], [0, r], [-0.55 * r, 0]])
        return _rotate(pts, theta) + np.array([cx, cy])
    elif shape == "cross":
        a, b = r, 0.33 * r
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                        [-b, b], [-a, b], [-a, -b], [-b, -b]])
        return _rotate(pts, theta) + np.array([cx, cy])
    elif shape == "arrow":
        pts = np.array([[-r, -0.25 * r], [0.1 * r, -0.25 * r], [0.1 * r, -0.65 * r], [r, 0],
                        [0.1 * r, 0.65 * r], [0.1 * r, 0.25 * r], [-r, 0.25 * r]])
        return _rotate(pts, theta) + np.array([cx, cy])
    else:
        raise ValueError(shape)
    pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    return _rotate(pts, theta) + np.array([cx, cy])


def _rotate(pts: np.ndarray, theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return pts @ np.array([[c, s], [-s, c]])


def _render_object(shape: str, h: int, w: int, cx: float, cy: float, r: float, theta: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[float] | None]:
    if shape in POLYGONS:
        poly = [round(float(v), 2) for v in _polygon_vertices(shape, cx, cy, r, theta).reshape(-1)]
        # Rasterised by pycocotools so a COCO reader decodes exactly the same pixels.
        return mask_utils.decode(mask_utils.frPyObjects([poly], h, w)[0]).astype(bool), poly
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    if shape == "circle":
        return d2 <= r * r, None
    if shape == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2), None
    # crescent: a disc minus a shifted disc
    ox, oy = 0.45 * r * np.cos(theta), 0.45 * r * np.sin(theta)
    return (d2 <= r * r) & ((xx - cx - ox) ** 2 + (yy - cy - oy) ** 2 > (0.85 * r) ** 2), None


def _texture(rng: np.random.Generator, h: int, w: int, contrast: float) -> np.ndarray:
    """float32 [H, W, 3] in [0, 255]: a random colour with stripes, checks or noise."""
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    other = np.clip(base + rng.uniform(-contrast, contrast, size=3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 4)
    if kind == 0:
        sel = np.zeros((h, w), dtype=np.float32)
    elif kind == 1:
        ang, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        sel = (np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        cell = int(rng.integers(6, 20))
        sel = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
    else:
        sel = rng.uniform(0, 1, size=(h, w)).astype(np.float32)
    return base * (1 - sel[..., None]) + other * sel[..., None]


def make_scene(rng: np.random.Generator, h: int, w: int, max_objects: int = 4) -> Scene:
    """One scene with exact ground truth; deterministic for a given generator state."""
    n = int(rng.integers(1, max_objects + 1))
    image = _texture(rng, h, w, contrast=60.0)
    image += rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    objects: list[SceneObject] = []
    for _ in range(n):
        label = int(rng.integers(1, len(SHAPES) + 1))
        r = float(rng.uniform(0.12, 0.32) * min(h, w))
        cx, cy = float(rng.uniform(r * 0.6, w - r * 0.6)), float(rng.uniform(r * 0.6, h - r * 0.6))
        m, poly = _render_object(SHAPES[label - 1], h, w, cx, cy, r, float(rng.uniform(0, 2 * np.pi)), rng)
        if m.sum() < MIN_VISIBLE:
            continue
        objects.append(SceneObject(label, m, poly))
        tex = _texture(rng, h, w, contrast=90.0)
        image[m] = tex[m]
    # Drop objects that later ones hid (keeping paint order), until every label is visible.
    while True:
        covered = np.zeros((h, w), dtype=bool)
        visible = [np.zeros((h, w), dtype=bool)] * len(objects)
        for i in range(len(objects) - 1, -1, -1):
            visible[i] = objects[i].mask & ~covered
            covered |= objects[i].mask
        small = [i for i, v in enumerate(visible) if v.sum() < MIN_VISIBLE]
        if not small:
            break
        objects = [o for i, o in enumerate(objects) if i not in small]
    if not objects:  # everything was too small: retry with a fresh layout
        return make_scene(rng, h, w, max_objects)
    # Repaint so dropped objects leave no pixels behind.
    canvas = _texture(np.random.default_rng(int(rng.integers(1 << 31))), h, w, contrast=60.0)
    mask = np.zeros((h, w), dtype=np.uint8)
    for o in objects:
        tex = _texture(rng, h, w, contrast=90.0)
        canvas[o.mask] = tex[o.mask]
        mask[o.mask] = o.label
    canvas += rng.normal(0, 4, size=(h, w, 3)).astype(np.float32)
    return Scene(np.clip(canvas, 0, 255).astype(np.uint8), mask, objects, visible)


def generate(num_images: int, seed: int, sizes: tuple[tuple[int, int], ...] = SIZES) -> list[tuple[str, Scene]]:
    """``num_images`` (image_id, scene) pairs, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_images):
        h, w = sizes[int(rng.integers(0, len(sizes)))]
        out.append((f"demo_{seed:04d}_{i:05d}", make_scene(rng, h, w)))
    return out


def split_ids(ids: list[str], val_fraction: float = 0.2) -> dict[str, list[str]]:
    n_val = max(1, round(len(ids) * val_fraction)) if len(ids) > 1 else 0
    return {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val:]}


def _voc_xml(image_id: str, scene: Scene) -> str:
    h, w = scene.mask.shape
    objs = []
    for o, v in zip(scene.objects, scene.visible, strict=True):
        ys, xs = np.nonzero(v)
        objs.append(
            f"<object><name>{SHAPES[o.label - 1]}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{xs.min() + 1}</xmin><ymin>{ys.min() + 1}</ymin><xmax>{xs.max() + 1}</xmax>"
            f"<ymax>{ys.max() + 1}</ymax></bndbox></object>"
        )
    return (f"<annotation><folder>demo</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{''.join(objs)}</annotation>\n")


def _coco_json(items: list[tuple[str, Scene]], ann_start: int) -> dict:
    categories = [{"id": category_id(i + 1), "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    images, anns = [], []
    aid = ann_start
    for n, (image_id, scene) in enumerate(items):
        h, w = scene.mask.shape
        images.append({"id": n + 1, "file_name": f"{image_id}.jpg", "height": h, "width": w})
        for o, v in zip(scene.objects, scene.visible, strict=True):
            occluded = bool((o.mask & ~v).any())
            if o.polygon is not None and not occluded:
                segm: list | dict = [o.polygon]
            else:
                rle = mask_utils.encode(np.asfortranarray(v.astype(np.uint8)))
                segm = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            ys, xs = np.nonzero(v)
            anns.append({
                "id": aid, "image_id": n + 1, "category_id": category_id(o.label), "iscrowd": 0,
                "area": int(v.sum()), "segmentation": segm,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            })
            aid += 1
    return {"info": {"description": "wsss-platform synthetic shapes"}, "images": images,
            "annotations": anns, "categories": categories}


def category_id(label: int) -> int:
    """COCO category id of a 1-based label: deliberately not contiguous, as in real COCO."""
    return label + (label - 1) // 3


def write_demo_dataset(out: str, layout: str, num_images: int, seed: int = 0,
                       options: StorageOptions | None = None,
                       progress: Callable[[int, int], None] | None = None, voc_aug: bool = False) -> dict[str, list[str]]:
    """Write a synthetic dataset to ``out`` in ``layout`` (voc|coco); returns the split ids.

    ``voc_aug``: VOC as the WSSS literature uses it: splits ``train_aug`` and ``val``, every ground
    truth in ``SegmentationClassAug/`` as single-channel PNGs, ``SegmentationClass/`` (palette) for
    the val ids only.
    """
    if num_images < 1:
        raise ValueError("num_images must be >= 1")
    items = generate(num_images, seed)
    splits = split_ids([i for i, _ in items])
    if voc_aug:
        splits = {"train_aug": splits["train"], "val": splits["val"]}
    val = set(splits.get("val", []))
    out = out.rstrip("/")
    done = [0]

    def write_one(item: tuple[str, Scene]) -> None:
        image_id, scene = item
        if layout == "voc":
            storage.write_bytes(storage.join(out, "JPEGImages", f"{image_id}.jpg"), encode_jpeg(scene.image), options)
            if not voc_aug or image_id in val:
                storage.write_bytes(storage.join(out, "SegmentationClass", f"{image_id}.png"),
                                    encode_mask_png(scene.mask), options)
            if voc_aug:
                storage.write_bytes(storage.join(out, "SegmentationClassAug", f"{image_id}.png"),
                                    encode_grey_png(scene.mask), options)
            storage.write_text(storage.join(out, "Annotations", f"{image_id}.xml"), _voc_xml(image_id, scene), options)
        else:
            storage.write_bytes(storage.join(out, "images", f"{image_id}.jpg"), encode_jpeg(scene.image), options)
        done[0] += 1
        if progress:
            progress(done[0], num_images)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write_one, items))
    by_id = dict(items)
    if layout == "voc":
        for split, ids in splits.items():
            storage.write_text(storage.join(out, "ImageSets", "Segmentation", f"{split}.txt"),
                               "".join(f"{i}\n" for i in ids), options)
        storage.write_text(storage.join(out, "classes.txt"), "".join(f"{n}\n" for n in SHAPES), options)
    elif layout == "coco":
        start = 1
        for split, ids in splits.items():
            doc = _coco_json([(i, by_id[i]) for i in ids], start)
            start += len(doc["annotations"])
            storage.write_text(storage.join(out, "annotations", f"instances_{split}.json"), json.dumps(doc), options)
    else:
        raise ValueError(f"unknown layout {layout!r}; use voc or coco")
    return splits

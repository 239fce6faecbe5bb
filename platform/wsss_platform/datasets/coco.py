"""COCO layout: ``annotations/instances_<split>.json`` plus an image folder.

Category ids map to contiguous labels 1..C in ascending id order; the mapping is recorded with
every output (``class_mapping``). Semantic masks are rendered from the instance segmentations
(polygons or RLE) with pycocotools: larger instances first so smaller ones stay visible on top,
crowd regions 255 (ignored). The instances JSON is parsed once, on the driver; each image's record
carries its own annotations (segmentation, crowd flag, area, label) to the worker that reads it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from wsss_core.classes import COCO_SYNONYMS, ClassSet
from wsss_platform import storage
from wsss_platform.datasets.base import DatasetError, Row, log, require_images
from wsss_platform.datasets.index import LAYOUT_READERS, RecordReader, encode_record, fingerprint
from wsss_platform.storage import StorageOptions


def annotation_uri(root: str, split: str) -> str:
    return storage.join(root, "annotations", f"instances_{split}.json")


def segmentation_to_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, RLE or uncompressed RLE) -> bool [h, w]."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(bool)


class COCODataset:
    layout = "coco"

    def __init__(self, root: str, split: str = "train", options: StorageOptions | None = None,
                 limit: int | None = None, max_pixels: int | None = None) -> None:
        self.uri, self.split, self.options = root.rstrip("/"), split, options
        ann_uri = annotation_uri(self.uri, split)
        if not storage.exists(ann_uri, options):
            found = [n for n in storage.list_names(storage.join(self.uri, "annotations"), options) if n.endswith(".json")]
            raise DatasetError(
                f"annotation file not found: {ann_uri} (found: {', '.join(found) or 'nothing'}); "
                "COCO layout expects annotations/instances_<split>.json"
            )
        self.ann_uri = ann_uri
        try:
            data = json.loads(storage.read_bytes(ann_uri, options))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{ann_uri} is not valid JSON: {e}") from None
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DatasetError(f"{ann_uri} has no '{key}' list; is it a COCO instances file?")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.label_of_category = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        names = tuple(str(c["name"]) for c in cats)
        try:
            self.classes = ClassSet(names, {k: v for k, v in COCO_SYNONYMS.items() if k in names})
        except ValueError as e:
            raise DatasetError(f"{ann_uri}: categories: {e}") from None
        self.images: dict[str, dict[str, Any]] = {}
        self._coco_id: dict[int, str] = {}
        self.duplicates: list[str] = []
        for im in data["images"]:
            image_id = os.path.splitext(os.path.basename(im["file_name"]))[0]
            if image_id in self.images:  # two entries, one output name: the first is used
                self.duplicates.append(image_id)
            else:
                self.images[image_id] = im
            self._coco_id[int(im["id"])] = image_id
        self.anns: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.orphan_annotations: list[int] = []
        for ann in data["annotations"]:
            image_id = self._coco_id.get(int(ann["image_id"]))
            if image_id is None:
                self.orphan_annotations.append(int(ann.get("id", -1)))
            else:
                self.anns[image_id].append(ann)
        if self.duplicates:
            log.warning("%s lists %d image(s) whose file names repeat (%s); each is used once", ann_uri,
                        len(self.duplicates), ", ".join(sorted(set(self.duplicates))[:5]))
        self.ids = sorted(self.images)
        require_images(self.ids, f"annotation file {ann_uri}")
        if limit is not None:
            self.ids = self.ids[:limit]
        self.max_pixels = max_pixels
        self.image_dir = self._find_image_dir()
        self.reader = RecordReader(self.reader_payload(), options)

    def reader_payload(self) -> dict[str, Any]:
        return {"layout": "coco", "image_dir": self.image_dir, "ann_uri": self.ann_uri, "max_pixels": self.max_pixels,
                "storage": storage.without_secrets(self.options)}

    def record(self, image_id: str) -> bytes:
        im = self.images[image_id]
        rec = {"image_id": image_id, "file_name": im["file_name"], "height": int(im["height"]),
               "width": int(im["width"])}
        try:
            rec["labels"] = self.labels(image_id)
        except DatasetError as e:  # this image fails alone, when a worker reads it
            return encode_record(rec | {"error": str(e)})
        anns = sorted(self.anns.get(image_id, []), key=lambda a: -float(a.get("area", 0)))
        rec["anns"] = [[a["segmentation"], int(a.get("iscrowd", 0)), self.label_of_category[int(a["category_id"])]]
                       for a in anns]
        return encode_record(rec)

    def records(self, ids: list[str]) -> list[bytes]:
        return [self.record(i) for i in ids]

    def _find_image_dir(self) -> str:
        for cand in (storage.join(self.uri, "images", self.split), storage.join(self.uri, self.split),
                     storage.join(self.uri, "images")):
            if storage.isdir(cand, self.options):
                return cand
        return storage.join(self.uri, "images")

    def image_uri(self, image_id: str) -> str:
        return storage.join(self.image_dir, self.images[image_id]["file_name"])

    def has_masks(self) -> bool:
        return True

    def class_mapping(self) -> dict[str, Any]:
        return {
            "layout": "coco",
            "classes": list(self.classes.names),
            "category_id_to_label": {str(k): v for k, v in self.label_of_category.items()},
        }

    def unknown_categories(self, image_id: str) -> list[int]:
        return sorted({int(a["category_id"]) for a in self.anns.get(image_id, [])} - set(self.label_of_category))

    def labels(self, image_id: str) -> list[int]:
        bad = self.unknown_categories(image_id)
        if bad:
            raise DatasetError(f"{self.ann_uri}: image {image_id} has annotations of unknown category ids {bad}")
        return sorted({self.label_of_category[int(a["category_id"])] for a in self.anns.get(image_id, [])
                       if not a.get("iscrowd", 0)})

    def render_mask(self, image_id: str) -> np.ndarray:
        rec = json.loads(self.record(image_id))
        return render_mask(rec["anns"], int(rec["height"]), int(rec["width"]))

    def load(self, image_id: str) -> Row:
        return self.reader.load(self.record(image_id))


def render_mask(anns: list[list[Any]], h: int, w: int) -> np.ndarray:
    """A record's ``[segmentation, iscrowd, label]`` list (largest first) -> uint8 [h, w] semantic mask."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for segm, crowd, label in anns:
        mask[segmentation_to_mask(segm, h, w)] = 255 if crowd else label
    return mask


def load_coco(reader: RecordReader, rec: dict[str, Any]) -> Row:
    """A COCO record -> its row: the image (checked against the annotated size) and the rendered mask."""
    p = reader.payload
    uri = storage.join(p["image_dir"], rec["file_name"])
    image = reader.image(uri)
    h, w = int(rec["height"]), int(rec["width"])
    if image.shape[:2] != (h, w):
        raise DatasetError(f"image {uri} is {image.shape[1]}x{image.shape[0]} but {p['ann_uri']} says {w}x{h} (w x h)")
    return Row(rec["image_id"], image, list(rec["labels"]), render_mask(rec["anns"], h, w))


LAYOUT_READERS["coco"] = load_coco


def coco_fingerprint(cfg) -> str:
    """The annotation file's URI, size and ETag (or mtime) and the settings that shape the records
    (``cfg``: a DatasetConfig): a changed file is a new index."""
    uri = annotation_uri(cfg.uri.rstrip("/"), cfg.split)
    info = storage.info(uri, cfg.storage) if storage.exists(uri, cfg.storage) else None
    return fingerprint({"ann": uri, "file": info,
                        "settings": cfg.model_dump(mode="json", include={"uri", "split"})})

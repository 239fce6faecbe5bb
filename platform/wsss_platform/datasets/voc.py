"""PASCAL VOC layout: JPEGImages/, SegmentationClass/, Annotations/, ImageSets/Segmentation/."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from wsss_core.classes import VOC, ClassSet
from wsss_platform import storage
from wsss_platform.datasets.base import (
    DatasetError,
    Row,
    decode_image,
    decode_mask,
    read_split_ids,
    require_images,
)
from wsss_platform.storage import StorageOptions


def read_class_names(root: str, options: StorageOptions | None = None) -> ClassSet:
    """The dataset's own ``classes.txt`` (one name a line, label order 1..C), else the VOC 20."""
    uri = storage.join(root, "classes.txt")
    if not storage.exists(uri, options):
        return VOC
    names = tuple(line.strip() for line in storage.read_text(uri, options).splitlines() if line.strip())
    if not names:
        raise DatasetError(f"{uri} is empty; list one class name a line, or delete it to use the VOC classes")
    try:
        return ClassSet(names, VOC.synonyms if set(names) <= set(VOC.names) else {})
    except ValueError as e:
        raise DatasetError(f"{uri}: {e}") from None


def parse_voc_xml(data: bytes, name: str) -> list[str]:
    """Object names in a VOC annotation XML, in file order (duplicates kept)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DatasetError(f"annotation {name} is not valid XML: {e}") from None
    return [(obj.findtext("name") or "").strip() for obj in root.iter("object")]


class VOCDataset:
    """A VOC-layout split on any URI.

    Args:
        root: dataset root (local path or ``s3://…``).
        split: name of ``ImageSets/Segmentation/<split>.txt``.
        labels_from: ``xml``, ``mask`` or ``auto`` (xml when ``Annotations/`` exists).
    """

    layout = "voc"

    def __init__(self, root: str, split: str = "train", labels_from: str = "auto",
                 options: StorageOptions | None = None, limit: int | None = None,
                 max_pixels: int | None = None) -> None:
        self.uri, self.split, self.options = root.rstrip("/"), split, options
        self.split_uri = split_uri = storage.join(self.uri, "ImageSets", "Segmentation", f"{split}.txt")
        if not storage.exists(split_uri, options):
            available = [n[:-4] for n in storage.list_names(storage.join(self.uri, "ImageSets", "Segmentation"), options)
                         if n.endswith(".txt")]
            raise DatasetError(
                f"split file not found: {split_uri} (available splits: {', '.join(available) or 'none'}); "
                "is --layout right and does the root point at the folder holding JPEGImages/?"
            )
        self.ids, self.duplicates = read_split_ids(storage.read_text(split_uri, options), split_uri)
        require_images(self.ids, f"split file {split_uri}")
        if limit is not None:
            self.ids = self.ids[:limit]
        self.max_pixels = max_pixels
        self.classes = read_class_names(self.uri, options)
        self._mask_names = set(storage.list_names(storage.join(self.uri, "SegmentationClass"), options))
        has_xml = storage.isdir(storage.join(self.uri, "Annotations"), options)
        if labels_from == "auto":
            labels_from = "xml" if has_xml else "mask"
        if labels_from == "xml" and not has_xml:
            raise DatasetError(f"labels_from=xml but {storage.join(self.uri, 'Annotations')} does not exist")
        if labels_from == "mask" and not self._mask_names:
            raise DatasetError(f"labels_from=mask but {storage.join(self.uri, 'SegmentationClass')} has no masks")
        self.labels_from = labels_from

    def image_uri(self, image_id: str) -> str:
        return storage.join(self.uri, "JPEGImages", f"{image_id}.jpg")

    def mask_uri(self, image_id: str) -> str:
        return storage.join(self.uri, "SegmentationClass", f"{image_id}.png")

    def xml_uri(self, image_id: str) -> str:
        return storage.join(self.uri, "Annotations", f"{image_id}.xml")

    def has_masks(self) -> bool:
        return bool(self._mask_names)

    def has_mask(self, image_id: str) -> bool:
        return f"{image_id}.png" in self._mask_names

    def class_mapping(self) -> dict[str, Any]:
        return {"layout": "voc", "classes": list(self.classes.names)}

    def xml_names(self, image_id: str) -> list[str]:
        uri = self.xml_uri(image_id)
        return parse_voc_xml(storage.read_bytes(uri, self.options), uri)

    def labels_from_xml(self, image_id: str) -> list[int]:
        uri = self.xml_uri(image_id)
        labels = set()
        for name in self.xml_names(image_id):
            try:
                labels.add(self.classes.label_of(name))
            except KeyError as e:
                raise DatasetError(f"{uri}: {e.args[0]}") from None
        return sorted(labels)

    def labels_from_mask(self, mask: np.ndarray, name: str) -> list[int]:
        values = np.unique(mask)
        bad = [int(v) for v in values if v != 255 and v > self.classes.num_classes]
        if bad:
            raise DatasetError(f"mask {name} has label values {bad} beyond the {self.classes.num_classes} classes")
        return [int(v) for v in values if 0 < v <= self.classes.num_classes]

    def load(self, image_id: str) -> Row:
        img_uri = self.image_uri(image_id)
        image = decode_image(storage.read_bytes(img_uri, self.options), img_uri, self.max_pixels)
        mask = None
        if self.has_mask(image_id):
            m_uri = self.mask_uri(image_id)
            mask = decode_mask(storage.read_bytes(m_uri, self.options), m_uri)
            if mask.shape != image.shape[:2]:
                raise DatasetError(
                    f"mask {m_uri} is {mask.shape[1]}x{mask.shape[0]} but image {img_uri} is "
                    f"{image.shape[1]}x{image.shape[0]} (w x h)"
                )
        if self.labels_from == "xml":
            labels = self.labels_from_xml(image_id)
        else:
            if mask is None:
                raise DatasetError(f"labels_from=mask but {self.mask_uri(image_id)} does not exist")
            labels = self.labels_from_mask(mask, self.mask_uri(image_id))
        return Row(image_id, image, labels, mask)

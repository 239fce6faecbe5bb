"""PASCAL VOC layout: JPEGImages/, SegmentationClass/, Annotations/, ImageSets/Segmentation/.

As the WSSS literature uses it: ``split: train_aug`` (10,582 ids) with ``masks_dir:
SegmentationClassAug`` (single-channel PNGs of label indices, the SBD-augmented ground truth).
Image-level labels come from the XMLs, read once on the driver into each image's record; ids
without an XML take theirs from ``labels_file`` when one is given.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from wsss_core.classes import VOC, ClassSet
from wsss_platform import storage
from wsss_platform.datasets.base import (
    DatasetError,
    Row,
    decode_mask,
    labels_from_mask,
    read_split_ids,
    require_images,
)
from wsss_platform.datasets.index import LAYOUT_READERS, RecordReader, encode_record, fingerprint
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


def read_labels_file(uri: str, classes: ClassSet, options: StorageOptions | None = None) -> dict[str, list[int]]:
    """``dataset.labels_file``: one image a line, ``<id> <class> <class> …`` (names or 1-based labels)."""
    out: dict[str, list[int]] = {}
    for n, line in enumerate(storage.read_text(uri, options).splitlines(), 1):
        image_id, *names = line.split()
        if not image_id or image_id.startswith("#"):
            continue
        labels = set()
        for name in names:
            try:
                label = int(name) if name.isdigit() else classes.label_of(name)
            except KeyError as e:
                raise DatasetError(f"{uri} line {n}: {e.args[0]}") from None
            if not 1 <= label <= classes.num_classes:
                raise DatasetError(f"{uri} line {n}: label {label} is not one of the classes 1..{classes.num_classes}")
            labels.add(label)
        out[image_id] = sorted(labels)
    return out


class VOCDataset:
    """A VOC-layout split on any URI.

    Args:
        root: dataset root (local path or ``s3://…``).
        split: name of ``ImageSets/Segmentation/<split>.txt``.
        labels_from: ``xml``, ``mask`` or ``auto`` (xml when ``Annotations/`` exists).
        masks_dir: the ground-truth folder (``SegmentationClass``, or ``SegmentationClassAug``).
        labels_file: labels of ids without an XML (see :func:`read_labels_file`).
    """

    layout = "voc"

    def __init__(self, root: str, split: str = "train", labels_from: str = "auto",
                 options: StorageOptions | None = None, limit: int | None = None,
                 max_pixels: int | None = None, masks_dir: str = "SegmentationClass",
                 labels_file: str | None = None) -> None:
        self.uri, self.split, self.options, self.masks_dir = root.rstrip("/"), split, options, masks_dir
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
        masks = storage.join(self.uri, masks_dir)
        self._mask_names = set(storage.list_names(masks, options))
        self._xml_names = set(storage.list_names(storage.join(self.uri, "Annotations"), options))
        has_xml = bool(self._xml_names) or storage.isdir(storage.join(self.uri, "Annotations"), options)
        if labels_from == "auto":
            labels_from = "xml" if has_xml else "mask"
        if labels_from == "xml" and not has_xml:
            raise DatasetError(f"labels_from=xml but {storage.join(self.uri, 'Annotations')} does not exist")
        if labels_from == "mask" and not self._mask_names:
            raise DatasetError(f"labels_from=mask but {masks} has no masks"
                               + ("" if masks_dir != "SegmentationClass" else
                                  " (for VOC's train_aug set dataset.masks_dir: SegmentationClassAug)"))
        self.labels_from = labels_from
        self.labels_file = labels_file
        self.file_labels = read_labels_file(labels_file, self.classes, options) if labels_file else {}
        self.reader = RecordReader(self.reader_payload(), options)
        self._records: dict[str, bytes] = {}

    def reader_payload(self) -> dict[str, Any]:
        return {"layout": "voc", "uri": self.uri, "masks_dir": self.masks_dir, "num_classes": self.classes.num_classes,
                "max_pixels": self.max_pixels, "storage": storage.without_secrets(self.options)}

    def _record(self, image_id: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"image_id": image_id, "mask": self.has_mask(image_id)}
        if self.labels_from == "mask":
            return rec | {"labels": None}
        if not self.has_xml(image_id) and image_id in self.file_labels:
            return rec | {"labels": self.file_labels[image_id]}
        try:
            return rec | {"labels": self.labels_from_xml(image_id)}
        except (DatasetError, storage.StorageError) as e:  # this image fails alone, when a worker reads it
            hint = "" if self.labels_file else " (ids without an XML: give dataset.labels_file)"
            return rec | {"labels": None, "error": f"{e}{hint}"}

    def record(self, image_id: str) -> bytes:
        if image_id not in self._records:
            self._records[image_id] = encode_record(self._record(image_id))
        return self._records[image_id]

    def records(self, ids: list[str], threads: int = 32) -> list[bytes]:
        """The records of ``ids``: each XML read once, on a few threads (object-store latency overlaps)."""
        todo = [i for i in ids if i not in self._records]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for image_id, rec in zip(todo, pool.map(self._record, todo), strict=True):
                self._records[image_id] = encode_record(rec)
        return [self._records[i] for i in ids]

    def image_uri(self, image_id: str) -> str:
        return storage.join(self.uri, "JPEGImages", f"{image_id}.jpg")

    def mask_uri(self, image_id: str) -> str:
        return storage.join(self.uri, self.masks_dir, f"{image_id}.png")

    def xml_uri(self, image_id: str) -> str:
        return storage.join(self.uri, "Annotations", f"{image_id}.xml")

    def has_masks(self) -> bool:
        return bool(self._mask_names)

    def has_xml(self, image_id: str) -> bool:
        return f"{image_id}.xml" in self._xml_names

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
        return labels_from_mask(mask, self.classes.num_classes, name)

    def load(self, image_id: str) -> Row:
        return self.reader.load(self.record(image_id))


def load_voc(reader: RecordReader, rec: dict[str, Any]) -> Row:
    """A VOC record -> its row: the JPEG, the mask when there is one, the labels (from the mask when
    the record has none)."""
    p, image_id = reader.payload, rec["image_id"]
    img_uri = storage.join(p["uri"], "JPEGImages", f"{image_id}.jpg")
    m_uri = storage.join(p["uri"], p["masks_dir"], f"{image_id}.png")
    image = reader.image(img_uri)
    mask = None
    if rec.get("mask"):
        mask = decode_mask(storage.read_bytes(m_uri, reader.options), m_uri)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"mask {m_uri} is {mask.shape[1]}x{mask.shape[0]} but image {img_uri} is "
                               f"{image.shape[1]}x{image.shape[0]} (w x h)")
    labels = rec.get("labels")
    if labels is None:
        if mask is None:
            raise DatasetError(f"labels_from=mask but {m_uri} does not exist")
        labels = labels_from_mask(mask, p["num_classes"], m_uri)
    return Row(image_id, image, list(labels), mask)


LAYOUT_READERS["voc"] = load_voc


def voc_fingerprint(cfg) -> str:
    """What a VOC split's records are made of (``cfg``: a DatasetConfig), from listings and sizes
    alone: the split file, the XMLs and masks (names, sizes, versions), classes.txt, the labels file."""
    root, opts = cfg.uri.rstrip("/"), cfg.storage

    def file(uri: str | None) -> dict | None:
        return storage.info(uri, opts) if uri and storage.exists(uri, opts) else None

    return fingerprint({
        "settings": cfg.model_dump(mode="json", include={"uri", "split", "labels_from", "masks_dir", "labels_file"}),
        "split": file(storage.join(root, "ImageSets", "Segmentation", f"{cfg.split}.txt")),
        "classes": file(storage.join(root, "classes.txt")), "labels_file": file(cfg.labels_file),
        "xml": sorted(storage.list_info(storage.join(root, "Annotations"), opts).items()),
        "masks": sorted(storage.list_names(storage.join(root, cfg.masks_dir), opts))})

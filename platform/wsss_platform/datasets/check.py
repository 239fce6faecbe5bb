"""``wsss data check``: validate a dataset before anyone spends GPU hours on it.

Every problem names the file it is about. Checks: split/annotation file present, image present
and decodable, mask decodable and of the image's size, mask values within the class list, XML or
COCO class names/ids known, and a non-empty label set.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from wsss_platform import storage
from wsss_platform.datasets import open_dataset
from wsss_platform.datasets.base import (
    DatasetConfig,
    DatasetError,
    ImageTooLarge,
    decode_image,
    decode_mask,
)
from wsss_platform.datasets.coco import COCODataset
from wsss_platform.datasets.voc import VOCDataset


@dataclass
class Problem:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class CheckReport:
    uri: str
    layout: str
    split: str
    classes: list[str] = field(default_factory=list)
    num_images: int = 0
    num_masks: int = 0
    class_histogram: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 50) -> str:
        lines = [f"dataset {self.uri} (layout {self.layout}, split {self.split})",
                 f"  images: {self.num_images}   ground-truth masks: {self.num_masks}   classes: {len(self.classes)}"]
        if self.class_histogram:
            lines.append("  images per class:")
            for label, name in enumerate(self.classes, start=1):
                lines.append(f"    {label:3d} {name:<20s} {self.class_histogram.get(label, 0)}")
        if self.sizes:
            sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in self.sizes.most_common(8))
            more = f" (+{len(self.sizes) - 8} more)" if len(self.sizes) > 8 else ""
            lines.append(f"  image sizes (w x h): {sizes}{more}")
        if self.problems:
            lines.append(f"  PROBLEMS: {len(self.problems)}")
            lines += [f"    {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"    … and {len(self.problems) - max_problems} more")
        else:
            lines.append("  no problems found")
        return "\n".join(lines)


def _check_voc(ds: VOCDataset, image_id: str) -> tuple[list[int] | None, tuple[int, int] | None, bool, list[Problem]]:
    problems: list[Problem] = []
    img_uri = ds.image_uri(image_id)
    shape = None
    try:
        shape = decode_image(storage.read_bytes(img_uri, ds.options), img_uri, ds.max_pixels).shape[:2]
    except storage.StorageError:
        problems.append(Problem(img_uri, "missing image (listed in the split file)"))
    except ImageTooLarge as e:
        problems.append(Problem(img_uri, f"too large: {e}"))
    except DatasetError as e:
        problems.append(Problem(img_uri, f"corrupt image: {str(e).split(': ', 1)[-1]}"))
    mask = None
    if ds.has_mask(image_id):
        m_uri = ds.mask_uri(image_id)
        try:
            mask = decode_mask(storage.read_bytes(m_uri, ds.options), m_uri)
        except (DatasetError, storage.StorageError) as e:
            problems.append(Problem(m_uri, f"corrupt mask: {e}"))
        if mask is not None:
            if shape is not None and mask.shape != shape:
                problems.append(Problem(m_uri, f"mask/image size mismatch: mask {mask.shape[1]}x{mask.shape[0]}, "
                                               f"image {shape[1]}x{shape[0]} (w x h)"))
            bad = sorted(int(v) for v in np.unique(mask) if v != 255 and v > ds.classes.num_classes)
            if bad:
                problems.append(Problem(m_uri, f"mask values {bad} are not classes (0..{ds.classes.num_classes} or 255)"))
    labels: list[int] | None = None
    unknown: list[str] = []
    if ds.labels_from == "xml" and not ds.has_xml(image_id) and image_id in ds.file_labels:
        labels = ds.file_labels[image_id]
    elif ds.labels_from == "xml":
        x_uri = ds.xml_uri(image_id)
        try:
            names = ds.xml_names(image_id)
            unknown = sorted({n for n in names if n not in ds.classes.names})
            if unknown:
                problems.append(Problem(x_uri, f"unknown class name(s) {unknown}; known: {', '.join(ds.classes.names)}"))
            labels = sorted({ds.classes.label_of(n) for n in names if n in ds.classes.names})
        except storage.StorageError:
            problems.append(Problem(x_uri, "missing annotation XML" + ("" if ds.labels_file else
                                                                        " (or give its labels in --labels-file)")))
        except DatasetError as e:
            problems.append(Problem(x_uri, str(e)))
    elif mask is not None:
        labels = [int(v) for v in np.unique(mask) if 0 < v <= ds.classes.num_classes]
    if labels is not None and not labels and not unknown:  # unknown names are the root cause already reported
        src = ds.xml_uri(image_id) if ds.labels_from == "xml" else ds.mask_uri(image_id)
        problems.append(Problem(src, "empty label set: no foreground class present (WSSS needs at least one)"))
    return labels, shape, mask is not None, problems


def _check_coco(ds: COCODataset, image_id: str) -> tuple[list[int] | None, tuple[int, int] | None, bool, list[Problem]]:
    problems: list[Problem] = []
    img_uri = ds.image_uri(image_id)
    shape = None
    try:
        shape = decode_image(storage.read_bytes(img_uri, ds.options), img_uri, ds.max_pixels).shape[:2]
    except storage.StorageError:
        problems.append(Problem(img_uri, f"missing image (listed in {ds.ann_uri})"))
    except ImageTooLarge as e:
        problems.append(Problem(img_uri, f"too large: {e}"))
    except DatasetError as e:
        problems.append(Problem(img_uri, f"corrupt image: {str(e).split(': ', 1)[-1]}"))
    meta = ds.images[image_id]
    if shape is not None and shape != (int(meta["height"]), int(meta["width"])):
        problems.append(Problem(img_uri, f"image is {shape[1]}x{shape[0]} but {ds.ann_uri} says "
                                         f"{meta['width']}x{meta['height']} (w x h): masks would not fit"))
    unknown = ds.unknown_categories(image_id)
    if unknown:
        problems.append(Problem(ds.ann_uri, f"image {image_id}: annotations with unknown category ids {unknown}"))
    labels = sorted({ds.label_of_category[int(a["category_id"])] for a in ds.anns.get(image_id, [])
                     if not a.get("iscrowd", 0) and int(a["category_id"]) in ds.label_of_category})
    if not labels and not unknown:
        problems.append(Problem(ds.ann_uri, f"image {image_id} ({meta['file_name']}): empty label set, no non-crowd annotation"))
    return labels, shape, True, problems


def check_dataset(cfg: DatasetConfig, workers: int = 16) -> CheckReport:
    """Open and scan every image of the split; never raises for per-image problems."""
    report = CheckReport(cfg.uri, cfg.layout, cfg.split)
    try:
        ds = open_dataset(cfg)
    except (DatasetError, storage.StorageError) as e:
        report.problems.append(Problem(cfg.uri, str(e)))
        return report
    if ds.duplicates:
        where = ds.ann_uri if isinstance(ds, COCODataset) else ds.split_uri
        what = "image file names" if isinstance(ds, COCODataset) else "ids"
        report.problems.append(Problem(where, f"{len(ds.duplicates)} duplicate {what} ({', '.join(sorted(set(ds.duplicates))[:10])}); "
                                              "readers use each once: remove the repeats"))
    report.classes = list(ds.classes.names)
    report.num_images = len(ds.ids)
    if isinstance(ds, COCODataset) and ds.orphan_annotations:
        report.problems.append(Problem(ds.ann_uri, f"{len(ds.orphan_annotations)} annotation(s) refer to no image "
                                                   f"(ids {ds.orphan_annotations[:5]})"))
    check = _check_voc if isinstance(ds, VOCDataset) else _check_coco
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for labels, shape, has_mask, problems in pool.map(lambda i: check(ds, i), ds.ids):
            report.problems += problems
            report.num_masks += int(has_mask)
            if shape is not None:
                report.sizes[shape] += 1
            for label in labels or []:
                report.class_histogram[label] += 1
    return report

"""The dataset contract shared by both layouts (DESIGN.md, "One data contract").

A row is ``{"image_id": str, "image": uint8 [H, W, 3], "labels": list[int] (1-based present
classes), "mask": uint8 [H, W] or None}``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from wsss_core.classes import ClassSet, voc_palette
from wsss_platform.config import Section
from wsss_platform.storage import StorageOptions, without_secrets

log = logging.getLogger("wsss.datasets")


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file and what to do."""


class ImageTooLarge(DatasetError):
    """An image over ``dataset.max_image_pixels``, refused before decoding."""


class DatasetConfig(Section):
    uri: str = ""
    """Dataset root: a local path or ``s3://bucket/prefix`` (required: ``--dataset``)."""
    layout: Literal["voc", "coco"] = "voc"
    split: str = "train"
    labels_from: Literal["auto", "xml", "mask"] = "auto"
    """VOC only: image-level labels from Annotations/*.xml, from the masks, or xml when present."""
    masks_dir: str = "SegmentationClass"
    """VOC only: the ground-truth folder; ``SegmentationClassAug`` for the ``train_aug`` split (10,582
    ids, single-channel PNGs) the WSSS literature trains on."""
    labels_file: str | None = None
    """VOC only: image-level labels of ids without an XML, one line each: ``<id> <class> <class> …``
    (class names or 1-based labels)."""
    limit: int | None = None
    """Use only the first N images of the split (quick runs, sweeps on a subset)."""
    max_image_pixels: int | None = Field(2_000_000, ge=1)
    """Larger images fail (named, with their size) before they are decoded. CLIP-ES attention
    memory grows with the square of the pixel count (ViT-B/16: ~6 GB at 2 MP), so one huge image
    would otherwise take its worker down. None: no cap. The labelers' memory follows it
    (``compute.memory_per_actor: auto``)."""
    storage: StorageOptions = StorageOptions()

    def worker_payload(self) -> dict[str, Any]:
        """This section for Ray workers (actors, trials, training workers), credentials left out:
        they resolve their own (inherited environment, credentials file, instance role; see ``init_ray``)."""
        return self.model_dump(mode="json") | {"storage": without_secrets(self.storage)}


@dataclass(frozen=True)
class Row:
    image_id: str
    image: np.ndarray
    labels: list[int]
    mask: np.ndarray | None

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "image": self.image, "labels": self.labels, "mask": self.mask}


class Dataset(Protocol):
    """A split: parsed on the driver, read per image by workers through its records."""

    uri: str
    split: str
    layout: str
    classes: ClassSet
    ids: list[str]

    def load(self, image_id: str) -> Row: ...

    def record(self, image_id: str) -> bytes:
        """What a worker needs to load this image (``index.RecordReader(reader_payload()).load``)."""
        ...

    def records(self, ids: list[str]) -> list[bytes]: ...

    def reader_payload(self) -> dict[str, Any]: ...

    def has_masks(self) -> bool: ...

    def class_mapping(self) -> dict[str, Any]: ...


# The size cap is ours (DatasetConfig.max_image_pixels, checked before decoding); PIL's own
# decompression-bomb limit would otherwise refuse large images that a user allowed.
Image.MAX_IMAGE_PIXELS = None


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H, W, 3]; raises DatasetError naming the file.

    The header is read first: an image over ``max_pixels`` fails before any pixel is decoded.
    """
    if not data:
        raise DatasetError(f"cannot decode image {name}: the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLarge(
                    f"image {name} is {w}x{h} ({w * h / 1e6:.1f} MP), over dataset.max_image_pixels={max_pixels}: "
                    "downscale it, or raise the cap (and with it compute.memory_per_actor)")
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except DatasetError:
        raise
    except UnidentifiedImageError:
        raise DatasetError(f"cannot decode image {name}: not a recognised image format ({len(data)} bytes)") from None
    except Exception as e:
        raise DatasetError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None


def read_split_ids(text: str, uri: str) -> tuple[list[str], list[str]]:
    """Image ids of a split file in order, each once; returns (ids, duplicates as listed again)."""
    ids: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        image_id = line.strip().split()[0]
        if image_id in seen:
            duplicates.append(image_id)
        else:
            seen.add(image_id)
            ids.append(image_id)
    if duplicates:
        log.warning("%s lists %d id(s) more than once (%s); each is used once", uri, len(duplicates),
                    ", ".join(sorted(set(duplicates))[:5]))
    return ids, duplicates


def require_images(ids: list[str], source: str) -> None:
    if not ids:
        raise DatasetError(f"{source} lists no images: nothing to do (check the split name and the file)")


def labels_from_mask(mask: np.ndarray, num_classes: int, name: str) -> list[int]:
    """The classes present in a ground-truth mask (1..num_classes; 0 and 255 are not labels)."""
    values = np.unique(mask)
    bad = [int(v) for v in values if v != 255 and v > num_classes]
    if bad:
        raise DatasetError(f"mask {name} has label values {bad} beyond the {num_classes} classes")
    return [int(v) for v in values if 0 < v <= num_classes]


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Palette or greyscale PNG -> uint8 [H, W] of label indices."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(
                    f"mask {name} has mode {im.mode}; expected a palette (P) or greyscale (L) PNG of label indices"
                )
            return np.asarray(im, dtype=np.uint8).copy()
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"cannot decode mask {name}: {type(e).__name__}: {e}") from None


def encode_mask_png(mask: np.ndarray) -> bytes:
    """uint8 [H, W] label indices -> palette PNG bytes (VOC colours, 255 = ignore)."""
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def encode_grey_png(mask: np.ndarray) -> bytes:
    """uint8 [H, W] label indices -> single-channel (L) PNG bytes, as VOC's SegmentationClassAug."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()

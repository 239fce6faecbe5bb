"""The dataset contract shared by both layouts (DESIGN.md, "One data contract").

A row is ``{"image_id": str, "image": uint8 [H, W, 3], "labels": list[int] (1-based present
classes), "mask": uint8 [H, W] or None}``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from wsss_core.classes import ClassSet, voc_palette
from wsss_platform.config import Section
from wsss_platform.storage import StorageOptions


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file and what to do."""


class DatasetConfig(Section):
    uri: str = "demo-data/voc"
    layout: Literal["voc", "coco"] = "voc"
    split: str = "train"
    labels_from: Literal["auto", "xml", "mask"] = "auto"
    """VOC only: image-level labels from Annotations/*.xml, from the masks, or xml when present."""
    limit: int | None = None
    """Use only the first N images of the split (quick runs, sweeps on a subset)."""
    storage: StorageOptions = StorageOptions()


@dataclass(frozen=True)
class Row:
    image_id: str
    image: np.ndarray
    labels: list[int]
    mask: np.ndarray | None

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "image": self.image, "labels": self.labels, "mask": self.mask}


class Dataset(Protocol):
    uri: str
    split: str
    classes: ClassSet
    ids: list[str]

    def load(self, image_id: str) -> Row: ...

    def has_masks(self) -> bool: ...

    def class_mapping(self) -> dict[str, Any]: ...


def decode_image(data: bytes, name: str) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H, W, 3]; raises DatasetError naming the file."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:
        raise DatasetError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None


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


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()

"""Dataset readers (VOC, COCO), the synthetic demo generator and ``wsss data check``."""

from __future__ import annotations

from wsss_platform.datasets.base import Dataset, DatasetConfig, DatasetError, Row
from wsss_platform.datasets.coco import COCODataset
from wsss_platform.datasets.voc import VOCDataset


def open_dataset(cfg: DatasetConfig) -> Dataset:
    """Open the split named by ``cfg`` (layout ``voc`` or ``coco``) on any URI."""
    if not cfg.uri:
        raise DatasetError("no dataset: pass --dataset URI (a local path or s3://bucket/prefix) or set dataset.uri "
                           "in the config (for a sweep: label.dataset.uri)")
    if cfg.layout == "voc":
        return VOCDataset(cfg.uri, cfg.split, cfg.labels_from, cfg.storage, cfg.limit, cfg.max_image_pixels)
    return COCODataset(cfg.uri, cfg.split, cfg.storage, cfg.limit, cfg.max_image_pixels)


__all__ = ["COCODataset", "Dataset", "DatasetConfig", "DatasetError", "Row", "VOCDataset", "open_dataset"]

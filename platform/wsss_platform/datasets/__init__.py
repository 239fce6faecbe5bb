"""Dataset readers (VOC, COCO), their per-image index, the synthetic demo generator and ``wsss data check``."""

from __future__ import annotations

from wsss_platform import storage
from wsss_platform.datasets.base import Dataset, DatasetConfig, DatasetError, Row
from wsss_platform.datasets.coco import COCODataset, coco_fingerprint
from wsss_platform.datasets.index import (
    IndexedDataset,
    RecordReader,
    from_parsed,
    index_uri,
    read_index,
    write_index,
)
from wsss_platform.datasets.voc import VOCDataset, voc_fingerprint

FINGERPRINTS = {"voc": voc_fingerprint, "coco": coco_fingerprint}
"""layout -> DatasetConfig -> the fingerprint of what its parse reads (without parsing)."""


def open_dataset(cfg: DatasetConfig) -> Dataset:
    """Open the split named by ``cfg`` (layout ``voc`` or ``coco``) on any URI."""
    if not cfg.uri:
        raise DatasetError("no dataset: pass --dataset URI (a local path or s3://bucket/prefix) or set dataset.uri "
                           "in the config (for a sweep: label.dataset.uri)")
    if cfg.layout == "voc":
        return VOCDataset(cfg.uri, cfg.split, cfg.labels_from, cfg.storage, cfg.limit, cfg.max_image_pixels,
                          cfg.masks_dir, cfg.labels_file)
    return COCODataset(cfg.uri, cfg.split, cfg.storage, cfg.limit, cfg.max_image_pixels)


def open_indexed(cfg: DatasetConfig, folder: str) -> tuple[IndexedDataset, str]:
    """The split with every image's record, parsed once per job: read back from the index in
    ``folder`` when one matches what the parse would read, else parsed. Returns (dataset, the
    index's URI); a job that goes ahead writes it there with :func:`keep_index` (after its checks:
    a refused run writes nothing). The index holds the whole split; ``dataset.limit`` and the size
    cap apply to what is returned."""
    if not cfg.uri:
        open_dataset(cfg)  # the error that says what to pass
    source = source_fingerprint(cfg)
    uri = index_uri(folder, cfg.split, source)
    if storage.exists(uri, cfg.storage):
        return read_index(uri, cfg.storage, limit=cfg.limit, max_pixels=cfg.max_image_pixels), uri
    full = open_dataset(cfg.model_copy(update={"limit": None}))
    return from_parsed(full, source, cfg.storage, cfg.limit, cfg.max_image_pixels), uri


def keep_index(ds: IndexedDataset, uri: str, options=None) -> None:
    """Write the index ``open_indexed`` parsed, unless it is there already (a rerun read it)."""
    if not storage.exists(uri, options):
        write_index(uri, ds, options)


def source_fingerprint(cfg: DatasetConfig) -> str:
    """What a split's parse reads (annotation files' sizes and versions, listings, the settings that
    shape the records), without parsing: a changed annotation file is another fingerprint."""
    return FINGERPRINTS[cfg.layout](cfg)


__all__ = ["COCODataset", "Dataset", "DatasetConfig", "DatasetError", "IndexedDataset", "RecordReader", "Row",
           "VOCDataset", "keep_index", "open_dataset", "open_indexed", "read_index", "source_fingerprint"]

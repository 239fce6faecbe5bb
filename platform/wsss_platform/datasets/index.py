"""A split parsed once: per-image records, the reader that turns one into a row, and the Parquet index.

The driver parses a split's annotations (COCO's instances JSON, VOC's split file and XMLs) once and
keeps, per image, the little its row needs: a *record* (``image_id``, labels, for COCO the file
name, size and the image's own annotations). Ray Data rows carry the records to the actors, which
hold only a :class:`RecordReader` (a few settings): no actor opens the annotation file, so an
actor's memory and start-up do not grow with the dataset (COCO 2014 train's JSON is ~450 MB and
~3 GB parsed in Python).

The records are also written beside the job's output as ``index/<split>-<fingerprint>.parquet``;
the fingerprint covers what the parse read (the annotation file's size and ETag or mtime, the
split file's, the XML listing's), so a rerun reads the Parquet instead of parsing again and a
changed annotation file is a new index (and a new settings fingerprint for the run).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np

from wsss_core.classes import ClassSet
from wsss_platform import storage
from wsss_platform.datasets.base import DatasetError, Row, decode_image
from wsss_platform.storage import StorageOptions

INDEX_VERSION = 1


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def decode_record(data: bytes | str | dict[str, Any]) -> dict[str, Any]:
    return data if isinstance(data, dict) else json.loads(data)


def fingerprint(parts: dict[str, Any]) -> str:
    """16 hex digits of what a parse read (sizes, ETags/mtimes, settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RecordReader:
    """A worker's half of a dataset: record -> :class:`Row`, reading only that image's files.

    ``payload`` (``Dataset.reader_payload()``) is small and the same for every image: the layout,
    where the files are, the class count, the size cap and the storage options.
    """

    def __init__(self, payload: dict[str, Any], options: StorageOptions | None = None) -> None:
        self.payload = payload
        # the driver's own options (credentials included, never in the payload); a worker's from the payload
        self.options = options or StorageOptions.model_validate(payload.get("storage") or {})
        self.max_pixels = payload.get("max_pixels")

    def image(self, uri: str) -> np.ndarray:
        return decode_image(storage.read_bytes(uri, self.options), uri, self.max_pixels)

    def load(self, record: bytes | str | dict[str, Any]) -> Row:
        rec = decode_record(record)
        if rec.get("error"):  # found at parse time (a bad XML, unknown category ids): this image fails alone
            raise DatasetError(rec["error"])
        return LAYOUT_READERS[self.payload["layout"]](self, rec)


LAYOUT_READERS: dict[str, Any] = {}
"""layout -> ``(reader, record) -> Row``, filled by the layout modules (``voc``, ``coco``)."""


class IndexedDataset:
    """A split read back from its Parquet index (the :class:`~wsss_platform.datasets.base.Dataset`
    protocol): what a rerun, a sweep trial or a training worker's validation opens instead of the
    annotation file."""

    def __init__(self, meta: dict[str, Any], records: dict[str, bytes], options: StorageOptions | None,
                 limit: int | None = None, max_pixels: int | None = None) -> None:
        self.meta, self.records_by_id, self.source = meta, records, meta["fingerprint"]
        self.uri, self.split, self.layout = meta["uri"], meta["split"], meta["layout"]
        self.classes = ClassSet(tuple(meta["classes"]), meta.get("synonyms") or {})
        self.ids = [i for i in meta["ids"] if i in records][:limit]
        # the index holds the whole split whatever the size cap: `limit` and the cap are the job's own
        reader = meta["reader"] | {"max_pixels": max_pixels, "storage": storage.without_secrets(options)}
        self.reader = RecordReader(reader, options)

    def record(self, image_id: str) -> bytes:
        return self.records_by_id[image_id]

    def records(self, ids: list[str]) -> list[bytes]:
        return [self.records_by_id[i] for i in ids]

    def reader_payload(self) -> dict[str, Any]:
        return self.reader.payload

    def load(self, image_id: str) -> Row:
        return self.reader.load(self.records_by_id[image_id])

    def has_masks(self) -> bool:
        return bool(self.meta["has_masks"])

    def class_mapping(self) -> dict[str, Any]:
        return self.meta["class_mapping"]


def index_meta(ds, source: str) -> dict[str, Any]:
    """What an index stores besides the records (``ds``: a freshly parsed dataset)."""
    reader = {k: v for k, v in ds.reader_payload().items() if k != "storage"}
    return {"version": INDEX_VERSION, "fingerprint": source, "uri": ds.uri, "split": ds.split, "layout": ds.layout,
            "classes": list(ds.classes.names), "synonyms": dict(ds.classes.synonyms), "ids": list(ds.ids),
            "has_masks": ds.has_masks(), "class_mapping": ds.class_mapping(), "reader": reader}


def index_uri(folder: str, split: str, source: str) -> str:
    return storage.join(folder, f"{split}-{source}.parquet")


def from_parsed(ds, source: str, options: StorageOptions | None, limit: int | None,
                max_pixels: int | None) -> IndexedDataset:
    """A freshly parsed split (``ds``, all its ids) as the index it writes (nothing written yet)."""
    return IndexedDataset(index_meta(ds, source), dict(zip(ds.ids, ds.records(ds.ids), strict=True)), options, limit,
                          max_pixels)


def write_index(uri: str, ds: IndexedDataset, options: StorageOptions | None = None) -> None:
    """The whole split's records and what else a reader needs, as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [i for i in ds.meta["ids"] if i in ds.records_by_id]
    table = pa.table({"image_id": pa.array(ids, pa.string()),
                      "record": pa.array([ds.records_by_id[i] for i in ids], pa.binary())})
    table = table.replace_schema_metadata({"wsss.index": json.dumps(ds.meta)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2048, compression="zstd")
    storage.write_bytes(uri, buf.getvalue(), options)


def read_index(uri: str, options: StorageOptions | None = None, ids: list[str] | None = None,
               limit: int | None = None, max_pixels: int | None = None) -> IndexedDataset:
    """The index at ``uri``; with ``ids``, only those images' records are kept (read a row group at a
    time, so a worker that needs a slice never holds the whole split)."""
    import pyarrow.parquet as pq

    with storage.open_uri(uri, "rb", options) as f:
        pf = pq.ParquetFile(f)
        meta = json.loads(pf.schema_arrow.metadata[b"wsss.index"])
        wanted = None if ids is None else set(ids)
        records: dict[str, bytes] = {}
        for batch in pf.iter_batches(batch_size=2048):
            for image_id, rec in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                if wanted is None or image_id in wanted:
                    records[image_id] = rec
    if meta.get("version") != INDEX_VERSION:
        raise DatasetError(f"{uri}: index version {meta.get('version')}, this wsss reads {INDEX_VERSION}; delete it "
                           "and rerun (it is rebuilt from the annotations)")
    return IndexedDataset(meta, records, options, limit, max_pixels)

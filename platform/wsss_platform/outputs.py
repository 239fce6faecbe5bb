"""The labeling output layout (DESIGN.md): masks/, cams/, manifest parts, manifest.parquet, run.json.

Completeness is decided by the manifest parts, which an actor writes only after every file of its
batch is in place; each file is written atomically. A crash therefore never leaves an image that
counts as complete with a missing or half-written mask: at worst a batch is redone.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wsss_platform import storage
from wsss_platform.storage import StorageOptions

PARTS = "manifest-parts"
INDEX = "index"
"""The folder of the dataset's per-image index (``datasets.index``): an input's cache, kept on --overwrite."""
AUX_PREFIX = "aux/"
INFLIGHT = "inflight"
RESULTS = ("masks", "pseudo", "confidence", "cams", PARTS, INFLIGHT, "manifest.parquet")

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("status", pa.string()),  # done | failed
    ("error", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("labels", pa.list_(pa.int32())),
    ("fg_fraction", pa.float32()),
    ("ignore_fraction", pa.float32()),
    ("seconds_load", pa.float32()),
    ("seconds_infer", pa.float32()),
    ("worker", pa.string()),
    ("finished_at", pa.float64()),
    # sparse confusion-matrix entries (flat index t * C' + p, count) vs ground truth, when present
    ("cm_raw_index", pa.list_(pa.int32())),
    ("cm_raw_count", pa.list_(pa.int64())),
    ("cm_index", pa.list_(pa.int32())),
    ("cm_count", pa.list_(pa.int64())),
])


def mask_uri(output: str, image_id: str) -> str:
    """The ready-to-use label: the pseudo mask with 255 where confidence < mask.mu."""
    return storage.join(output, "masks", f"{image_id}.png")


def pseudo_uri(output: str, image_id: str) -> str:
    """The pseudo mask before the confidence cut (any mu can be applied later with ``confidence/``)."""
    return storage.join(output, "pseudo", f"{image_id}.png")


def confidence_uri(output: str, image_id: str) -> str:
    return storage.join(output, "confidence", f"{image_id}.png")


def encode_confidence_png(conf: np.ndarray) -> bytes:
    """float [H, W] in [0, 1] -> 8-bit grayscale PNG of round(255 · Conf)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(conf, 0, 1) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_confidence_png(data: bytes) -> np.ndarray:
    """The PNG of :func:`encode_confidence_png` -> float32 [H, W] in [0, 1] (steps of 1/255)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im, dtype=np.float32) / 255.0


DAMAGED = "the labeling output holds a damaged file; relabel it (`wsss label --overwrite` into it, or into a new output)"
"""The fix for a file of a labeling output that does not decode."""


def check_classes(output: str, names: list[str], key: str, options: StorageOptions | None = None) -> None:
    """Refuse a labeling output whose labels mean other classes (or the same ones in another order)
    than ``names``: label k of its masks and CAMs is class ``names[k - 1]`` only when its run.json says so."""
    import json

    uri = storage.join(output, "run.json")
    if not storage.exists(uri, options):
        raise ValueError(f"{key}: {uri} not found: {output} is not a `wsss label` output (its run.json names the "
                         "classes its labels mean); label the split into it first")
    theirs = list(json.loads(storage.read_text(uri, options)).get("classes", {}).get("classes", []))
    if theirs != list(names):
        diff = next((f"label {i + 1} is {a!r} there, {b!r} here" for i, (a, b) in enumerate(zip(theirs, names, strict=False))
                     if a != b), f"{len(theirs)} classes there, {len(names)} here")
        raise ValueError(f"{key}: {output} was labelled for other classes than this dataset's ({diff}; {uri}); "
                         "label this dataset into a new output, or train on the dataset it was labelled from")


def check_files(output: str, folder: str, suffix: str, ids: list[str], key: str,
                options: StorageOptions | None = None) -> None:
    """Every id's ``<folder>/<id><suffix>`` is there: one listing, not one request per file."""
    have = set(storage.list_names(storage.join(output, folder), options))
    missing = [i for i in ids if f"{i}{suffix}" not in have]
    if missing:
        first = storage.join(output, folder, f"{missing[0]}{suffix}")
        raise ValueError(f"{key}: {first} not found ({len(missing)} of {len(ids)} images lack {folder}/): is {output} "
                         f"a `wsss label` output of this split? An interrupted labeling finishes when run again; "
                         "files lost from a finished one come back with `wsss label --overwrite` (or into a new output)")


def cams_uri(output: str, image_id: str) -> str:
    return storage.join(output, "cams", f"{image_id}.npz")


CACHE_DTYPE = "float16"  # what cams/<id>.npz keeps the CAMs and aux in


def encode_cams(cams: np.ndarray, labels: list[int], size: tuple[int, int], class_scores: np.ndarray,
                aux: dict[str, np.ndarray] | None = None) -> bytes:
    """float16 CAMs [K, h, w], the labels, image size and class scores; with ``aux`` (``cache:
    full``) also what the refiners read, float16 under ``aux/<key>``: all a refinement-only pass needs."""
    buf = io.BytesIO()
    extra = {f"{AUX_PREFIX}{k}": v.astype(CACHE_DTYPE) for k, v in (aux or {}).items()}
    np.savez_compressed(buf, cams=cams.astype(CACHE_DTYPE), labels=np.asarray(labels, dtype=np.int32),
                        size=np.asarray(size, dtype=np.int32), class_scores=class_scores.astype(np.float32), **extra)
    return buf.getvalue()


def decode_cams(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a ``cams/<id>.npz``; aux ones keep their ``aux/`` prefix (see :func:`aux_of`)."""
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def aux_of(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"attn/8": [N, N]}`` from decoded arrays."""
    return {k[len(AUX_PREFIX):]: v for k, v in arrays.items() if k.startswith(AUX_PREFIX)}


def write_part(output: str, rows: list[dict[str, Any]], options: StorageOptions | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(output, PARTS, f"{uuid.uuid4().hex}.parquet"), buf.getvalue(), options)


def read_parts(output: str, options: StorageOptions | None = None) -> pa.Table:
    """All manifest parts, one row per image (the latest part wins; a retried batch may repeat rows)."""
    names = [n for n in storage.list_names(storage.join(output, PARTS), options) if n.endswith(".parquet")]

    def read(name: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, PARTS, name), options))).cast(
            MANIFEST_SCHEMA)

    # one part a batch: a resume of a large job reads hundreds of small objects, latency-bound one by one
    with ThreadPoolExecutor(max_workers=16) as pool:
        tables = list(pool.map(read, names))
    if not tables:
        return MANIFEST_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    order = np.argsort(np.asarray(table.column("finished_at").to_numpy(zero_copy_only=False)), kind="stable")
    latest: dict[str, int] = {}
    ids = table.column("image_id").to_pylist()
    for i in order:
        latest[ids[i]] = int(i)
    keep = sorted(latest.values(), key=lambda i: ids[i])
    return table.take(pa.array(keep, type=pa.int64()))


def write_table(uri: str, table: pa.Table, options: StorageOptions | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue(), options)


class InFlight:
    """Markers of the batches (and images) being labelled now, one job run at a time.

    A marker that is still there when a batch is retried means the attempt before died with it:
    Ray restarted the actor, and the retry must isolate the image that killed it. Markers carry the
    run's token, so a marker left by an earlier, killed run is never taken for this run's.
    """

    def __init__(self, output: str, token: str, options: StorageOptions | None = None) -> None:
        self.output, self.token, self.options = output, token, options

    def uri(self, ids: list[str]) -> str:
        key = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20]
        return storage.join(self.output, INFLIGHT, f"{self.token}-{key}")

    def exists(self, ids: list[str]) -> bool:
        return storage.exists(self.uri(ids), self.options)

    def create(self, ids: list[str]) -> None:
        storage.write_bytes(self.uri(ids), "\n".join(ids).encode(), self.options)

    def remove(self, ids: list[str]) -> None:
        storage.remove(self.uri(ids), self.options)

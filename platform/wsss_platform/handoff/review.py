"""The review order: every image's doubt (``wsss_core.review``), most doubtful first, as ``review.parquet``
beside the export and as a table on the output's MLflow run."""

from __future__ import annotations

import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from wsss_core.review import doubt
from wsss_platform import storage
from wsss_platform.handoff.source import MaskOutput

COLUMNS = ("rank", "image_id", "doubt", "low_confidence", "fg_confidence", "disagreement")


def review_table(src: MaskOutput, against: MaskOutput | None = None, order: str = "doubt",
                 threads: int = 16) -> pa.Table:
    """One row per done image of ``src``: its doubt terms, ``rank`` 1 the most doubtful (``order`` doubt)
    or the id order (``order`` id); ``against``: a second output of the same images (disagreement)."""
    if against is not None and against.classes != src.classes:
        raise ValueError(f"--against: {against.uri} has other classes than {src.uri} (their run.json files differ)")

    def one(image_id: str) -> dict:
        other = against.mask(image_id) if against is not None else None
        d = doubt(src.mask(image_id), src.confidence(image_id), src.mu, other)
        return {"image_id": image_id, "doubt": d.doubt, "low_confidence": d.low, "fg_confidence": d.fg_conf,
                "disagreement": d.disagree}

    missing = sorted(set(src.done) - set(against.done)) if against is not None else []
    if missing:
        raise ValueError(f"--against: {against.uri} lacks {len(missing)} of the images (e.g. {missing[0]}); "
                         "compare two outputs of the same split")
    with ThreadPoolExecutor(threads) as pool:  # PNG reads: I/O bound on object storage
        rows = list(pool.map(one, src.done))
    rows.sort(key=(lambda r: (-r["doubt"], r["image_id"])) if order == "doubt" else (lambda r: r["image_id"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=pa.schema([
        ("rank", pa.int32()), ("image_id", pa.string()), ("doubt", pa.float32()), ("low_confidence", pa.float32()),
        ("fg_confidence", pa.float32()), ("disagreement", pa.float32())]))


def write_review(table: pa.Table, folder: str, options=None) -> str:
    uri = storage.join(folder, "review.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue(), options)
    return uri


def log_review(src: MaskOutput, table: pa.Table) -> str | None:
    """The order as a table ``review-<time>.json`` on the output's MLflow run (its artifacts, and the runs'
    Evaluation view); None when the output has no run in this tracking store (tracking off, another store).
    One name per export: ``log_table`` appends to a table of the same name, which would mix two exports."""
    if not src.run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    from wsss_platform.console import quiet_mlflow
    from wsss_platform.tracking import tracking_uri

    quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    try:
        mlflow.MlflowClient().get_run(src.run_id)
    except MlflowException:
        return None
    name = f"review-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
    mlflow.log_table(table.to_pandas(), artifact_file=name, run_id=src.run_id)
    return name

"""A ``wsss label`` or ``wsss predict`` output read for hand-off: its classes, its images, its masks."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow.parquet as pq

from wsss_platform import outputs, storage
from wsss_platform.datasets import Dataset, DatasetConfig, open_dataset
from wsss_platform.datasets.base import decode_mask
from wsss_platform.storage import StorageOptions


@dataclass
class MaskOutput:
    """``uri``'s run.json and manifest: ``kind`` label (masks from ``pseudo/``, before the mu cut) or
    predict (``masks/``, the argmax), the class names (label k is ``classes[k - 1]``), done and failed ids."""

    uri: str
    kind: str
    classes: list[str]
    mapping: dict
    """run.json's ``classes`` entry (COCO: also ``category_id_to_label``)."""
    mu: float
    run_id: str | None
    run_name: str
    dataset_cfg: DatasetConfig
    done: list[str]
    failed: list[str]
    options: StorageOptions = field(default_factory=StorageOptions)

    @cached_property
    def dataset(self) -> Dataset:
        return open_dataset(self.dataset_cfg)

    def mask_file(self, image_id: str) -> str:
        return storage.join(self.uri, "pseudo" if self.kind == "label" else "masks", f"{image_id}.png")

    def mask(self, image_id: str) -> np.ndarray:
        return decode_mask(storage.read_bytes(self.mask_file(image_id), self.options), self.mask_file(image_id))

    def confidence(self, image_id: str) -> np.ndarray:
        return outputs.decode_confidence_png(storage.read_bytes(outputs.confidence_uri(self.uri, image_id), self.options))


def open_output(uri: str, mu: float | None = None, options: StorageOptions | None = None) -> MaskOutput:
    """Read ``uri`` (local or s3://); a folder that is not a finished labeling or prediction output is refused.
    ``options`` reach the output and the dataset it was made from (credentials from the environment)."""
    uri, options = uri.rstrip("/"), options or StorageOptions()
    run_uri, manifest_uri = storage.join(uri, "run.json"), storage.join(uri, "manifest.parquet")
    for need in (run_uri, manifest_uri):
        if not storage.exists(need, options):
            raise ValueError(f"--from: {need} not found: {uri} is not a finished `wsss label` or `wsss predict` output "
                             "(run the job into it first, or point --from at its output folder)")
    info = json.loads(storage.read_text(run_uri, options))
    classes = list(info.get("classes", {}).get("classes", []))
    if not classes:
        raise ValueError(f"--from: {run_uri} names no classes (written by an older `wsss predict`): predict into it again")
    cfg = info.get("config", {})
    kind = "label" if "settings" in info else "predict"
    rows = pq.read_table(io.BytesIO(storage.read_bytes(manifest_uri, options)), columns=["image_id", "status"]).to_pylist()
    dataset = DatasetConfig.model_validate({**cfg.get("dataset", {}), "storage": options or StorageOptions()})
    return MaskOutput(
        uri=uri, kind=kind, classes=classes, mapping=info["classes"],
        mu=float(mu if mu is not None else cfg.get("mask", {}).get("mu", 0.95)),
        run_id=info.get("mlflow_run_id") or _run_id(info.get("mlflow_run_url", "")),
        run_name=info.get("mlflow_run_name") or uri.rsplit("/", 1)[-1], dataset_cfg=dataset,
        done=[r["image_id"] for r in rows if r["status"] == "done"],
        failed=[r["image_id"] for r in rows if r["status"] != "done"], options=options)


def _run_id(url: str) -> str | None:
    """The run id in a run URL ``…/#/experiments/E/runs/<id>?…`` (outputs written before run.json kept the id)."""
    if "/runs/" not in url:
        return None
    return url.split("/runs/", 1)[1].split("?", 1)[0].strip("/") or None

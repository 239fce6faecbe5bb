"""The prediction job's typed config (``wsss predict``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wsss_platform.config import Section
from wsss_platform.datasets.base import DatasetConfig


class PredictCompute(Section):
    gpus_per_actor: float | Literal["auto"] = "auto"
    """auto: one GPU per predicting actor when the cluster has GPUs, else CPU."""
    max_actors: int | None = Field(None, ge=1)
    """At most this many predicting actors (default: one per GPU, or 1 on CPU)."""
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    """Images a Ray Data batch hands to an actor (predicted one at a time: sizes differ)."""
    torch_threads: int | None = Field(None, ge=1)


class PredictTracking(Section):
    enabled: bool = True
    experiment: str = "wsss-predict"
    run_name: str | None = None
    preview_images: int = Field(4, ge=0)


class PredictConfig(Section):
    checkpoint: str = ""
    """A ``checkpoint_*`` folder of ``wsss train``, or a training output (its latest checkpoint)."""
    dataset: DatasetConfig = DatasetConfig()
    output: str = "predict-output"
    """masks/ (argmax), confidence/ (round(255 · max softmax)), manifest.parquet, run.json."""
    scales: list[float] = Field(default_factory=lambda: [1.0])
    """Multi-scale inference: softmax averaged over these scales (reference 0.5 … 1.75)."""
    flip: bool = False
    compute: PredictCompute = PredictCompute()
    tracking: PredictTracking = PredictTracking()
    ray_address: str | None = None

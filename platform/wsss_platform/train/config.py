"""The training job's typed config (``wsss train segmenter``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from wsss_platform.config import Section
from wsss_platform.datasets.base import DatasetConfig


class SegmenterModel(Section):
    backbone: str = "open_clip:ViT-B-16"
    """A timm model name (CNN or ViT) or ``open_clip:<name or model-config JSON>`` (a CLIP visual tower)."""
    pretrained: str = "openai"
    """``none``, ``timm`` (timm's own weights), an open_clip tag, or a weights file (path or s3:// URI)."""
    head: Literal["aspp", "largefov"] = "aspp"
    output_stride: Literal[8, 16] = 16
    """CNN backbones only."""


class Schedule(Section):
    pseudo_masks: str = ""
    """A ``wsss label`` output (its pseudo/ and confidence/), or ``none`` to train on the ground truth."""
    mu: float = Field(0.95, ge=0.0, le=1.0)
    """CGL: pixels whose pseudo-mask confidence is below mu are ignored (0 = plain cross-entropy)."""
    iterations: int = Field(20000, ge=1)
    batch_size: int = Field(8, ge=1)
    """Per worker."""
    crop_size: int = Field(512, ge=16)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    lr: float = Field(0.01, gt=0)
    head_lr_mult: float = Field(10.0, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd (DeepLab's, with ``momentum``) or adamw (betas 0.9/0.999; ViT backbones usually train better with it)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD only."""
    weight_decay: float = Field(1e-4, ge=0)
    warmup_iterations: int = Field(0, ge=0)
    poly_power: float = Field(0.9, ge=0)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPU, off on CPU."""
    checkpoint_every: int = Field(1000, ge=1)
    eval_every: int = Field(1000, ge=1)
    val_split: str | None = "val"
    """Split scored during and after training (needs ground truth); None skips evaluation."""
    eval_scales: list[float] = Field(default_factory=lambda: [1.0])
    eval_flip: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _scales(self) -> Schedule:
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range: need 0 < low <= high, got {self.scale_range}")
        return self


class TrainCompute(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    loader_cpus: float = Field(0.5, gt=0)
    """CPUs of each Ray Data actor that reads and augments the crops (beside the workers' CPUs)."""
    loader_actors: int = Field(1, ge=1)
    """At most this many loader actors (Ray Data scales the pool from 1 while the workers wait on data)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: PACK fills a node first; STRICT_SPREAD puts each on its own node."""
    torch_threads: int | None = Field(None, ge=1)
    max_failures: int = Field(3, ge=0)
    """Worker-group restarts from the last checkpoint before the run fails."""
    checkpoints_to_keep: int = Field(2, ge=1)


class TrainTracking(Section):
    enabled: bool = True
    experiment: str = "wsss-train"
    run_name: str | None = None
    register_as: str | None = None
    """Register the final model under this name in the MLflow model registry."""
    preview_images: int = Field(4, ge=0)
    """Training images in the run's preview.png (image | prediction | pseudo mask | ground truth)."""


class TrainConfig(Section):
    dataset: DatasetConfig = DatasetConfig()
    output: str = "train-output"
    """Checkpoints and the run's state (local path or s3://)."""
    model: SegmenterModel = SegmenterModel()
    train: Schedule = Schedule()
    compute: TrainCompute = TrainCompute()
    tracking: TrainTracking = TrainTracking()
    overwrite: bool = False
    """Start over in an output that holds a training (its checkpoints and state are removed)."""
    ray_address: str | None = None

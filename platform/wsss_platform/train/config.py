"""The training jobs' typed configs: one per recipe (``wsss train segmenter``, ``toco``, ``affinity``) on
a shared base (data, output, compute, tracking) and a shared schedule (iterations, crops, optimiser)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from wsss_core.refine import RandomWalk
from wsss_platform.config import Section
from wsss_platform.datasets.base import DatasetConfig


class ModelBase(Section):
    """A recipe's network section: its ``backbone`` is checked when the config is read, so a misspelt
    name fails in a second, before Ray starts or anything is written."""

    backbone: str

    @field_validator("backbone")
    @classmethod
    def _known(cls, name: str) -> str:
        from wsss_core.models.backbones import check_backbone_name

        check_backbone_name(name)
        return name


class SegmenterModel(ModelBase):
    backbone: str = "open_clip:ViT-B-16"
    """A timm model name (CNN or ViT) or ``open_clip:<name or model-config JSON>`` (a CLIP visual tower)."""
    pretrained: str = "openai"
    """``none``, ``timm`` (timm's own weights), an open_clip tag, or a weights file (path or s3:// URI)."""
    head: Literal["aspp", "largefov", "conv"] = "aspp"
    """``conv``: a light 3×3 + 1×1 head, the usual choice on a frozen backbone."""
    output_stride: Literal[8, 16] = 16
    """CNN backbones only."""
    freeze_backbone: bool = False
    """Train the head alone on the backbone's features, computed once per image and cached
    (``train.feature_cache``): minutes on a CPU, and a training sweep's trials reuse one cache. The
    trained network (backbone + head) predicts like a fine-tuned one."""


class ScheduleBase(Section):
    """What every recipe's schedule has; a recipe's own section adds its losses' settings."""

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
    seed: int = 0

    @model_validator(mode="after")
    def _scales(self) -> ScheduleBase:
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range: need 0 < low <= high, got {self.scale_range}")
        return self


class Schedule(ScheduleBase):
    """The segmenter's schedule: CGL on pseudo masks."""

    pseudo_masks: str = ""
    """A ``wsss label`` output (its pseudo/ and confidence/), or ``none`` to train on the ground truth."""
    mu: float = Field(0.95, ge=0.0, le=1.0)
    """CGL: pixels whose pseudo-mask confidence is below mu are ignored (0 = plain cross-entropy)."""
    eval_scales: list[float] = Field(default_factory=lambda: [1.0])
    eval_flip: bool = False
    feature_scale: float = Field(1.0, gt=0, le=4)
    """model.freeze_backbone: the images are resized by it before their features are computed (1: each
    image at its own size); predict at this scale (``eval_scales``)."""
    feature_cache: str = ""
    """model.freeze_backbone: where the features are kept (default ``<output>/features``); trainings of
    the same backbone, weights and scale share one (a sweep's trials do)."""
    label_pitch: int = Field(4, ge=1)
    """model.freeze_backbone: the loss is taken at one label pixel in ``pitch`` each way (the logits
    upsampled from the grid to that pitch): boundaries within ``pitch`` / 2 pixels at a 16th of the
    full-resolution loss's cost, which is most of a step on a CPU."""


class TrainCompute(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    loader_cpus: float = Field(0.5, gt=0)
    """CPUs of each Ray Data task that reads and augments the crops (beside the workers' CPUs)."""
    loader_tasks: int = Field(1, ge=1)
    """At most this many loader tasks at once."""
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


class TrainBase(Section):
    """What every recipe's config has; a recipe adds ``model`` and ``train`` sections."""

    recipe: ClassVar[str]
    dataset: DatasetConfig = DatasetConfig()
    output: str = "train-output"
    """Checkpoints and the run's state (local path or s3://)."""
    compute: TrainCompute = TrainCompute()
    tracking: TrainTracking = TrainTracking()
    overwrite: bool = False
    """Start over in an output that holds a training (its checkpoints and state are removed)."""
    ray_address: str | None = None


class TrainConfig(TrainBase):
    """``wsss train segmenter``: the segmenter on pseudo masks with CGL."""

    recipe: ClassVar[str] = "segmenter"
    model: SegmenterModel = SegmenterModel()
    train: Schedule = Schedule()


class ToCoModel(ModelBase):
    backbone: str = "deit_base_patch16_224"
    """A timm ViT name, or ``open_clip:<name or model-config JSON>`` (a CLIP visual tower)."""
    pretrained: str = "timm"
    """``none``, ``timm`` (timm's own weights), an open_clip tag, or a weights file (path or s3:// URI)."""
    aux_layer: int = -3
    """The block the auxiliary classifier (and PTC's token labels) reads, from the end."""
    proj_dim: int = Field(1024, ge=1)
    """CTC's projection-head output width."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """EMA momentum of CTC's teacher head."""


class ToCoSchedule(ScheduleBase):
    """ToCo's schedule; defaults are the authors' VOC script (METHODS.md). COCO: high 0.65, temp 1.0."""

    iterations: int = Field(20000, ge=1)
    batch_size: int = Field(2, ge=1)
    """Per worker (the reference: 2 images on each of 2 GPUs)."""
    crop_size: int = Field(448, ge=32)
    lr: float = Field(6e-5, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    weight_decay: float = Field(0.01, ge=0)
    warmup_iterations: int = Field(1500, ge=0)
    checkpoint_every: int = Field(2000, ge=1)
    eval_every: int = Field(2000, ge=1)
    high: float = Field(0.7, gt=0, le=1)
    """CAM above this: a confident class (token labels, ROI, segmentation labels)."""
    low: float = Field(0.25, ge=0, lt=1)
    """CAM at or below this: confident background."""
    bkg: float = Field(0.5, gt=0, le=1)
    """Background threshold of the CAM pseudo masks scored on the val split."""
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    """Scales of the CAMs that make the token labels, CTC's ROI and the segmentation labels while training."""
    eval_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    """Scales of the CAMs scored on the val split (and the ``toco`` labeling source's)."""
    local_crops: int = Field(8, ge=1)
    """CTC's local crops per image (the authors' ncrops − 2)."""
    local_crop_size: int = Field(96, ge=16)
    global_view_scale: tuple[float, float] = (0.4, 1.0)
    """CTC's second global view: a random resized crop of the whole image of this area fraction (the
    first is the training crop itself)."""
    color_jitter: bool = True
    """DINO's colour jitter (p 0.8) and greying (p 0.2), drawn apart for the training crop, the second
    global view and the image the local crops are cut from."""
    temp: float = Field(0.5, gt=0)
    w_ptc: float = Field(0.2, ge=0)
    w_ctc: float = Field(0.5, ge=0)
    w_seg: float = Field(0.1, ge=0)
    w_reg: float = Field(0.05, ge=0)
    seg_from: int = Field(2000, ge=0)
    """Iteration from which the segmentation head (and its CRF regulariser) learns."""
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iterations: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _bands(self) -> ToCoSchedule:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.local_crop_size >= self.crop_size:
            raise ValueError(f"local_crop_size ({self.local_crop_size}) must be smaller than crop_size ({self.crop_size})")
        return self


class ToCoConfig(TrainBase):
    """``wsss train toco``: ToCo on image-level labels (its CAMs label with ``cam_source=toco``)."""

    recipe: ClassVar[str] = "toco"
    model: ToCoModel = ToCoModel()
    train: ToCoSchedule = ToCoSchedule()


class AffinityModel(ModelBase):
    backbone: str = "resnet50"
    """A timm CNN (dilated to ``output_stride``; PSA: ResNet-38), a timm ViT, or ``open_clip:<name or
    model-config JSON>`` (a CLIP visual tower)."""
    pretrained: str = "timm"
    """``none``, ``timm`` (timm's own weights), an open_clip tag, or a weights file (path or s3:// URI)."""
    depths: tuple[int, ...] = (-3, -2, -1)
    """The stages (CNN) or blocks (ViT) whose features make the affinity, from the end."""
    dims: tuple[int, ...] = (64, 128, 256)
    """Each depth's channels after its 1×1 reduction (PSA's)."""
    output_stride: Literal[8, 16] = 8
    """CNN backbones only."""
    input_scale: float = Field(1.0, gt=0, le=4)
    """The network reads images resized by it: 2 puts a patch-16 ViT's grid at PSA's stride 8 (finer
    walks, 4× the tokens); train on crops of ``crop_size`` / 2 to keep the cost of a step."""

    @model_validator(mode="after")
    def _pairs(self) -> AffinityModel:
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have the same length")
        return self


class AffinitySchedule(ScheduleBase):
    """AffinityNet's schedule; defaults are PSA's (``train_aff.py``: SGD lr 0.1, wd 5e-4, batch 8,
    448² crops, the new layers at 10× lr; 8 epochs of VOC train_aug ≈ 10.6k iterations)."""

    iterations: int = Field(10000, ge=1)
    crop_size: int = Field(448, ge=32)
    scale_range: tuple[float, float] = (0.9, 1.5)
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    val_split: str | None = "train"
    """A split the CAMs cover (their own): its first ``eval_images`` are scored, raw CAM vs random walk."""
    cams: str = ""
    """A ``wsss label`` output of this split whose cams/ hold the CAMs (any CAM source)."""
    alpha_low: float = Field(4.0, gt=0)
    """Background power of confident foreground (PSA's la)."""
    alpha_high: float = Field(32.0, gt=0)
    """Background power of confident background (PSA's ha)."""
    radius: int = Field(RandomWalk.radius, ge=2, le=16)
    crf: bool = False
    """PSA sharpens both confident maps with a dense CRF (needs pydensecrf)."""
    eval_images: int = Field(100, ge=1)
    beta: float = Field(RandomWalk.beta, gt=0)
    """Random walk while scoring (the ``random_walk`` refiner's keys and defaults)."""
    t: int = Field(RandomWalk.t, ge=0)
    alpha: float = Field(RandomWalk.alpha, gt=0)

    @model_validator(mode="after")
    def _powers(self) -> AffinitySchedule:
        if self.alpha_low >= self.alpha_high:
            raise ValueError(f"alpha_low ({self.alpha_low}) must be below alpha_high ({self.alpha_high})")
        return self


class AffinityConfig(TrainBase):
    """``wsss train affinity``: PSA's AffinityNet on the CAMs of a labeling output (then ``refine: [random_walk]``)."""

    recipe: ClassVar[str] = "affinity"
    model: AffinityModel = AffinityModel()
    train: AffinitySchedule = AffinitySchedule()

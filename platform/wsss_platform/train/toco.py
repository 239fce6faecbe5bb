"""``wsss train toco``: ToCo on image-level labels (the recipe; the loop and job are shared).

Data: each training image with its image-level labels, randomly rescaled, cropped (the crop's
padding marked invalid, the authors' image box) and flipped, with CTC's second global view (a random
resized crop of the whole image) and the colour jitters of the authors' views, in Ray Data actors. Step: the whole
ToCo objective (``wsss_core.losses.toco``) as one module, so DDP syncs every gradient. Validation:
the val split labeled by the network itself through the labeling pipeline: the CAM pseudo masks
(``toco`` source, background below ``train.bkg``) and the segmentation head's masks (``toco_seg``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from wsss_core.augment import color_jitter, random_resized_crop, random_scale_crop_flip
from wsss_core.losses.toco import ToCoObjective, ToCoTraining
from wsss_core.pipeline import LabelingPipeline, PseudoMasker
from wsss_core.registry import CAM_SOURCES
from wsss_platform.datasets import RecordReader
from wsss_platform.datasets.base import Row
from wsss_platform.preview import colour, heatmap
from wsss_platform.train.config import ToCoConfig, TrainBase
from wsss_platform.train.data import rows_of
from wsss_platform.train.evaluate import unwrap
from wsss_platform.train.recipes import Panel, Recipe

OUTPUTS = {"cam": "toco", "seg": "toco_seg"}
"""Validation metric prefix -> the CAM source that labels with the network."""


class ImageLabelLoader:
    """Ray Data callable: image ids -> augmented crops, multi-hot labels and the valid-pixel mask."""

    def __init__(self, reader: dict[str, Any], train: dict[str, Any], num_classes: int) -> None:
        self.reader, self.num_classes = RecordReader(reader), num_classes
        self.train, self.rng = train, np.random.default_rng()

    def jitter(self, image: np.ndarray) -> np.ndarray:
        return color_jitter(image, self.rng) if self.train["color_jitter"] else image

    def sample(self, image_id: str, record: bytes) -> dict[str, np.ndarray]:
        row = self.reader.load(record)
        labels = np.zeros(self.num_classes, np.float32)
        labels[[c - 1 for c in row.labels]] = 1
        blank = np.zeros(row.image.shape[:2], np.uint8)  # the crop pads its mask with 255: that is the padding
        t = self.train
        crop, pad, _ = random_scale_crop_flip(row.image, blank, blank, t["crop_size"], tuple(t["scale_range"]),
                                              self.rng, t["flip"])
        view = random_resized_crop(row.image, t["crop_size"], tuple(t["global_view_scale"]), self.rng)
        if t["flip"] and self.rng.random() < 0.5:
            view = view[:, ::-1]
        # the crop under two independent colour jitters: the input, and where CTC's local crops are cut
        return {"image": self.jitter(crop), "labels": labels, "valid": pad == 0,
                "view": self.jitter(np.ascontiguousarray(view)), "local": self.jitter(crop)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = [self.sample(i, r) for i, r in rows_of(batch)]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def label_with(net: torch.nn.Module, source: str, classes, bkg: float, scales: tuple[float, ...]) -> LabelingPipeline:
    """The labeling pipeline on a network being trained: ``source`` with no refiner."""
    return LabelingPipeline(CAM_SOURCES.get(source).from_network(net, classes, scales=scales),
                            PseudoMasker([], bg_rule="threshold", bg_value=bkg, mu=0.0))


class ToCoRecipe(Recipe):
    name: ClassVar[str] = "toco"
    config: ClassVar[type[TrainBase]] = ToCoConfig
    description: ClassVar[str] = "ToCo (token contrast) on image-level labels: CAMs and a segmentation head"
    score: ClassVar[str] = "val_cam_miou"
    kind: ClassVar[str] = "toco"
    loader: ClassVar[type] = ImageLabelLoader
    val_outputs: ClassVar[tuple[str, ...]] = tuple(f"val_{k}" for k in OUTPUTS)

    cfg: ToCoConfig

    def labels(self) -> str:
        return "image-level labels"

    def objective(self) -> ToCoObjective:
        t = self.cfg.train
        return ToCoObjective(high=t.high, low=t.low, cam_scales=tuple(t.cam_scales), local_crops=t.local_crops,
                             local_crop_size=t.local_crop_size, temp=t.temp, w_ptc=t.w_ptc, w_ctc=t.w_ctc,
                             w_seg=t.w_seg, w_reg=t.w_reg, seg_from=t.seg_from, par_dilations=tuple(t.par_dilations),
                             par_iterations=t.par_iterations)

    def network_spec(self, class_names: list[str]) -> dict[str, Any]:
        m = self.cfg.model
        return {"backbone": m.backbone, "aux_layer": m.aux_layer, "proj_dim": m.proj_dim, "momentum": m.momentum,
                "class_names": list(class_names)}

    def build(self, class_names: list[str], weights: Any) -> torch.nn.Module:
        return ToCoTraining(super().build(class_names, weights), self.objective())

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.net

    def losses(self, module: torch.nn.Module, batch: dict[str, torch.Tensor], iteration: int,
               device: torch.device) -> dict[str, torch.Tensor]:
        net = unwrap(module).net
        pixels, view, local = (net.normalize(batch[k].to(device)) for k in ("image", "view", "local"))
        terms = module(pixels, batch["labels"].to(device), iteration, batch["valid"].to(device).bool(), view, local)
        total = terms.pop("total")
        return {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}

    def pipelines(self, net: torch.nn.Module, ds) -> dict[str, LabelingPipeline]:
        """Val output prefix -> the labeling pipeline of its CAM source on ``net``."""
        t = self.cfg.train
        return {f"val_{k}": label_with(net, s, ds.classes, t.bkg, tuple(t.eval_scales)) for k, s in OUTPUTS.items()}

    def val_masker(self, net: torch.nn.Module, ds, device: torch.device,
                   final: bool) -> Callable[[Row], dict[str, torch.Tensor]]:
        pipelines = self.pipelines(net, ds)
        return lambda row: {k: p([row.image], [row.labels])[0].mask_raw for k, p in pipelines.items()}

    def preview_panels(self, net: torch.nn.Module, ds) -> Callable[[Row], list[Panel]]:
        """image | CAM (max over the present classes) | CAM pseudo mask | head's mask | ground truth."""
        cam, seg = self.pipelines(net, ds).values()

        def cells(row: Row) -> list[Panel]:
            c, s = cam([row.image], [row.labels])[0], seg([row.image], [row.labels])[0]
            heat = heatmap(c.scores.amax(0).numpy()) if len(row.labels) else np.zeros_like(row.image)
            return [("image", row.image, False), ("CAM", heat, False),
                    ("CAM mask", colour(c.mask_raw.numpy(), row.image), True),
                    ("seg head", colour(s.mask_raw.numpy(), row.image), True),
                    ("ground truth", colour(row.mask, row.image), True)]
        return cells

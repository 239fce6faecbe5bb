"""``wsss train segmenter``: the final segmenter on pseudo masks with the confidence-guided loss.

Data: each training image with its pseudo mask and confidence from a ``wsss label`` output (or the
ground truth, ``train.pseudo_masks: none``), randomly rescaled, cropped and flipped in Ray Data
actors; with ``model.freeze_backbone`` the backbone's features are computed once
(``train.features``) and the head trains on crops of that grid. Step: CGL (``wsss_core.losses``).
Validation: the whole network on the val images as ``wsss predict`` runs it (single-scale while
training, the configured scales and flip at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from wsss_core.losses import cgl_loss
from wsss_platform import outputs, storage
from wsss_platform.datasets.base import Row
from wsss_platform.preview import colour
from wsss_platform.train import data, features
from wsss_platform.train.config import TrainBase, TrainConfig
from wsss_platform.train.evaluate import segment, unwrap
from wsss_platform.train.features import FeatureSampleLoader, FrozenHead
from wsss_platform.train.recipes import Panel, Recipe


class SegmenterRecipe(Recipe):
    """The segmenter (DeepLab-style on a timm or CLIP backbone) on pseudo masks with CGL."""

    name: ClassVar[str] = "segmenter"
    config: ClassVar[type[TrainBase]] = TrainConfig
    description: ClassVar[str] = "the final segmenter on pseudo masks, with the confidence-guided loss"
    score: ClassVar[str] = "val_miou"
    kind: ClassVar[str] = "segmenter"
    loader: ClassVar[type] = data.SampleLoader
    val_outputs: ClassVar[tuple[str, ...]] = ("val",)

    cfg: TrainConfig

    @property
    def frozen(self) -> bool:
        return self.cfg.model.freeze_backbone

    def labels(self) -> str:
        return "ground truth" if data.uses_ground_truth(self.cfg) else f"pseudo masks (mu {self.cfg.train.mu})"

    def absolute_train(self) -> dict[str, Any]:
        pseudo = self.cfg.train.pseudo_masks
        return {"pseudo_masks": pseudo if data.uses_ground_truth(self.cfg) else storage.absolute(pseudo)}

    def check(self, ds, val_ids: list[str]) -> None:
        if data.uses_ground_truth(self.cfg):
            data.check_ground_truth(self.cfg, ds)
        else:
            data.check_pseudo_masks(self.cfg, ds.ids, list(ds.classes.names))

    def prepare(self, ds, ids: list[str], class_names: list[str], use_gpu: bool, log: Callable[[str], None]) -> None:
        """A frozen backbone's features computed once per image (or found in the cache)."""
        if not self.frozen:
            return
        log(f"[wsss train] computing the frozen backbone's features of {len(ids)} images (cached: reused when "
            "the backbone, its weights, the scale and the image are the same)")
        uri, computed = features.ensure_features(self.cfg, ds, ids, class_names, use_gpu)
        log(f"[wsss train] features: {computed} computed, {len(ids) - computed} reused ({uri})")

    def loader_kwargs(self, ds) -> dict[str, Any]:
        pseudo = None if data.uses_ground_truth(self.cfg) else self.cfg.train.pseudo_masks
        return {"reader": ds.reader_payload(), "pseudo_masks": pseudo}

    def dataset(self, ds, ids: list[str]):
        if not self.frozen:
            return super().dataset(ds, ids)
        # crops of the feature grid `prepare` cached
        return data.loader_dataset(self.cfg, ds, ids, FeatureSampleLoader, **self.loader_kwargs(ds),
                                   uri=features.cache_uri(self.cfg))

    def network_spec(self, class_names: list[str]) -> dict[str, Any]:
        return features.segmenter_spec(self.cfg, class_names)

    def build(self, class_names: list[str], weights: Any) -> torch.nn.Module:
        net = features.build_segmenter(self.cfg, class_names, weights)
        return FrozenHead(net, self.cfg.train.label_pitch) if self.frozen else net

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.segmenter if isinstance(module, FrozenHead) else module

    def losses(self, module: torch.nn.Module, batch: dict[str, torch.Tensor], iteration: int,
               device: torch.device) -> dict[str, torch.Tensor]:
        if self.frozen:
            logits = module(batch["features"].to(device).float())
        else:
            logits = module(unwrap(module).normalize(batch["image"].to(device)))
        mask, conf = batch["mask"].to(device).long(), batch["confidence"].to(device).float() / 255
        return {"loss": cgl_loss(logits, mask, conf, self.cfg.train.mu)}

    def val_masker(self, net: torch.nn.Module, ds, device: torch.device,
                   final: bool) -> Callable[[Row], dict[str, torch.Tensor]]:
        t = self.cfg.train
        scales, flip = (t.eval_scales, t.eval_flip) if final else ([1.0], False)
        return lambda row: {"val": segment(net, row.image, device, scales, flip).argmax(0).cpu()}

    def preview_panels(self, net: torch.nn.Module, ds) -> Callable[[Row], list[Panel]]:
        """image | prediction | pseudo mask (what it learned from) | ground truth."""
        def cells(row: Row) -> list[Panel]:
            pred = segment(net, row.image, torch.device("cpu")).argmax(0).numpy().astype(np.uint8)
            pseudo = row.mask if data.uses_ground_truth(self.cfg) else data.read_label_png(
                outputs.pseudo_uri(self.cfg.train.pseudo_masks, row.image_id), self.cfg.dataset.storage)
            return [("image", row.image, False), ("prediction", colour(pred, row.image), True),
                    ("pseudo mask", colour(pseudo, row.image), True), ("ground truth", colour(row.mask, row.image), True)]
        return cells

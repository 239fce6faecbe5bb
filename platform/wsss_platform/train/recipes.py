"""Training recipes: what differs between ``wsss train segmenter``, ``toco`` and ``affinity``.

The job (driver), the loop (each worker) and the checkpoints are one code path; a recipe supplies
the config class, the training data, the module and its losses, validation, and the picture of
what it learned. ``RECIPES`` maps the command's name to its recipe, so nothing names a method in
an ``if``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from wsss_platform.storage import StorageOptions
from wsss_platform.train.config import TrainBase, TrainConfig


class Recipe(Protocol):
    """One way to train. Built with its config (``config``); runs on the driver and the workers.

    ``score``: the val metric that ranks checkpoints (and that the run summary reports).
    """

    name: ClassVar[str]
    config: ClassVar[type[TrainBase]]
    score: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, cfg: Any) -> None: ...

    def labels(self) -> str:
        """What it learns from, in words (the run's tag and the start line)."""
        ...

    def absolute_train(self) -> dict[str, Any]:
        """``train`` section values made absolute for the workers (local paths)."""
        ...

    def check(self, ids: list[str], names: list[str]) -> None:
        """On the driver: the inputs training reads exist and were made for the dataset's class ``names``
        (errors name the file and the fix)."""
        ...

    def dataset(self, ids: list[str], payload: dict[str, Any]):
        """The Ray Dataset of augmented training samples."""
        ...

    # Optional: ``prepare(ids, payload, num_classes, use_gpu, log)``, on the driver once Ray runs and
    # before the workers start (the segmenter's frozen features are computed there).

    def build(self, num_classes: int, weights: Any) -> torch.nn.Module:
        """The module trained (with ``param_groups(lr, head_lr_mult, weight_decay)``)."""
        ...

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        """What a checkpoint keeps of the trained module."""
        ...

    def spec(self, module: torch.nn.Module, class_names: list[str]) -> dict[str, Any]:
        """Checkpoint entries, besides the weights, that rebuild the network with no config at hand."""
        ...

    def losses(self, module: torch.nn.Module, batch: dict[str, torch.Tensor], iteration: int,
               device: torch.device) -> dict[str, torch.Tensor]:
        """The loss terms of one batch; ``loss`` is what is minimised."""
        ...

    def validation(self, module: torch.nn.Module, ds, config: dict[str, Any], device: torch.device,
                   final: bool) -> dict[str, float]:
        """Val metrics (``<score>`` among them, per-class IoUs as ``<name>_iou/<class>``); ``ds`` None: {}."""
        ...

    def load(self, uri: str, options: StorageOptions | None) -> tuple[torch.nn.Module, list[str]]:
        """(network in eval mode, class names) from a checkpoint folder."""
        ...

    def preview(self, net: torch.nn.Module, ds) -> bytes:
        """A PNG of what the network does on the first training images."""
        ...


class SegmenterRecipe:
    """The segmenter (DeepLab-style on a timm or CLIP backbone) on pseudo masks with CGL."""

    name: ClassVar[str] = "segmenter"
    config: ClassVar[type[TrainBase]] = TrainConfig
    score: ClassVar[str] = "val_miou"
    description: ClassVar[str] = "the final segmenter on pseudo masks, with the confidence-guided loss"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def labels(self) -> str:
        from wsss_platform.train import data

        return "ground truth" if data.uses_ground_truth(self.cfg) else f"pseudo masks (mu {self.cfg.train.mu})"

    def absolute_train(self) -> dict[str, Any]:
        from wsss_platform import storage
        from wsss_platform.train import data

        pseudo = self.cfg.train.pseudo_masks
        return {"pseudo_masks": pseudo if data.uses_ground_truth(self.cfg) else storage.absolute(pseudo)}

    def check(self, ids: list[str], names: list[str]) -> None:
        from wsss_platform.train import data

        data.check_pseudo_masks(self.cfg, ids, names)

    def prepare(self, ids: list[str], payload: dict[str, Any], num_classes: int, use_gpu: bool, log) -> None:
        """A frozen backbone's features computed once per image (or found in the cache)."""
        from wsss_platform.train import features

        if not self.cfg.model.freeze_backbone:
            return
        log(f"[wsss train] computing the frozen backbone's features of {len(ids)} images (cached: reused when "
            "the backbone, its weights, the scale and the image are the same)")
        uri, computed = features.ensure_features(self.cfg, ids, payload, num_classes, use_gpu)
        log(f"[wsss train] features: {computed} computed, {len(ids) - computed} reused ({uri})")

    def dataset(self, ids: list[str], payload: dict[str, Any]):
        from wsss_platform.train import data, features

        if self.cfg.model.freeze_backbone:  # the cache `prepare` filled
            return data.feature_dataset(self.cfg, ids, payload, features.cache_uri(self.cfg))
        return data.train_dataset(self.cfg, ids, payload)

    def build(self, num_classes: int, weights: Any) -> torch.nn.Module:
        from wsss_platform.train.features import FrozenHead, build_segmenter

        net = build_segmenter(self.cfg, num_classes, weights)
        return FrozenHead(net, self.cfg.train.label_pitch) if self.cfg.model.freeze_backbone else net

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        from wsss_platform.train.features import FrozenHead

        return module.segmenter if isinstance(module, FrozenHead) else module

    def spec(self, module: torch.nn.Module, class_names: list[str]) -> dict[str, Any]:
        from wsss_platform.train.checkpoint import segmenter_spec

        return {"segmenter": segmenter_spec(self.cfg.model.model_dump(mode="json"), class_names)}

    def losses(self, module: torch.nn.Module, batch: dict[str, torch.Tensor], iteration: int,
               device: torch.device) -> dict[str, torch.Tensor]:
        from wsss_core.losses import cgl_loss
        from wsss_platform.train.evaluate import unwrap

        if self.cfg.model.freeze_backbone:
            logits = module(batch["features"].to(device).float())
        else:
            logits = module(unwrap(module).normalize(batch["image"].to(device)))
        mask, conf = batch["mask"].to(device).long(), batch["confidence"].to(device).float() / 255
        return {"loss": cgl_loss(logits, mask, conf, self.cfg.train.mu)}

    def validation(self, module: torch.nn.Module, ds, config: dict[str, Any], device: torch.device,
                   final: bool) -> dict[str, float]:
        from wsss_platform.train import evaluate

        # the whole network on the val images, as `wsss predict` runs it
        return evaluate.validation(self.cfg, self.network(evaluate.unwrap(module)), ds, config, device, final)

    def load(self, uri: str, options: StorageOptions | None) -> tuple[torch.nn.Module, list[str]]:
        from wsss_platform.train.checkpoint import load_segmenter

        return load_segmenter(uri, options)

    def preview(self, net: torch.nn.Module, ds) -> bytes:
        from wsss_platform.label import outputs
        from wsss_platform.train import data, evaluate

        rows = []
        for image_id in ds.ids[: self.cfg.tracking.preview_images]:
            row = ds.load(image_id)
            pseudo = row.mask if data.uses_ground_truth(self.cfg) else data.read_label_png(
                outputs.pseudo_uri(self.cfg.train.pseudo_masks, image_id), self.cfg.dataset.storage)
            rows.append((image_id, row.image, pseudo, row.mask))
        return evaluate.preview(net, rows)


def _toco() -> type:
    from wsss_platform.train.toco import ToCoRecipe

    return ToCoRecipe


def _affinity() -> type:
    from wsss_platform.train.affinity import AffinityRecipe

    return AffinityRecipe


RECIPES: dict[str, Any] = {"segmenter": lambda: SegmenterRecipe, "toco": _toco, "affinity": _affinity}
"""Command name -> a function giving the recipe class (imported when used)."""


def recipe_class(name: str) -> type:
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown training recipe {name!r}; known: {', '.join(RECIPES)}") from None


def recipe_for(cfg: TrainBase) -> Any:
    """The recipe object of a config (its class's ``recipe`` name)."""
    return recipe_class(type(cfg).recipe)(cfg)

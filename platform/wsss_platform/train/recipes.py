"""Training recipes: what differs between ``wsss train segmenter``, ``toco`` and ``affinity``.

The job (driver), the loop (each worker) and the checkpoints are one code path, and :class:`Recipe`
owns what every recipe shares: the Ray Data loader over its sample function, the validation loop
over its val masks (each worker a slice, confusion matrices all-reduced), the preview grid, building
the network and loading it back (``wsss_core.models.create_network`` / ``network_from_state``). A
recipe (a subclass, one module each: ``segmenter``, ``toco``, ``affinity``) supplies its config,
loader, network spec, losses, val masks and preview panels. Subclasses register themselves by
``name``, so nothing names a method in an ``if``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from wsss_core.metrics import ConfusionMatrix
from wsss_core.models.networks import create_network
from wsss_platform.checkpoint import load_network
from wsss_platform.datasets.base import Dataset, Row
from wsss_platform.preview import panels
from wsss_platform.storage import StorageOptions
from wsss_platform.train.config import TrainBase
from wsss_platform.train.data import loader_dataset
from wsss_platform.train.evaluate import all_reduce, iou_metrics, my_slice, unwrap

RECIPES: dict[str, type[Recipe]] = {}
"""Command name -> recipe class (each subclass registers itself)."""
BUILTIN = ("wsss_platform.train.segmenter", "wsss_platform.train.toco", "wsss_platform.train.affinity")

Panel = tuple[str, np.ndarray, bool]  # (title, image or mask, nearest-neighbour scaling)


class Recipe:
    """One way to train, built with its config (``config``); runs on the driver and the workers.

    Class attributes: ``name`` (the command), ``config``, ``description``, ``score`` (the val metric
    that ranks checkpoints and that the summary reports), ``kind`` (the network kind its checkpoints
    hold), ``loader`` (the Ray Data callable: image ids -> samples), ``val_outputs`` (the metric
    prefixes its val masks are scored under).
    """

    name: ClassVar[str]
    config: ClassVar[type[TrainBase]]
    description: ClassVar[str]
    score: ClassVar[str]
    kind: ClassVar[str]
    loader: ClassVar[type]
    val_outputs: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RECIPES[cls.name] = cls

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # what it learns from (the driver)
    def labels(self) -> str:
        """What it learns from, in words (the run's tag and the start line)."""
        raise NotImplementedError

    def absolute_train(self) -> dict[str, Any]:
        """``train`` section values made absolute for the workers (local paths)."""
        return {}

    def check(self, ds: Dataset, val_ids: list[str]) -> None:
        """The inputs training reads exist (for the split ``ds``'s ids, and the val split's) and were
        made for the dataset's classes (errors name the file and the fix); by default nothing beyond
        the split itself."""

    def prepare(self, ds: Dataset, ids: list[str], class_names: list[str], use_gpu: bool,
                log: Callable[[str], None]) -> None:
        """Once Ray runs and before the workers start (the segmenter's frozen features); by default nothing."""

    # data
    def loader_kwargs(self, ds: Dataset) -> dict[str, Any]:
        """The loader's constructor arguments besides the ``train`` section (``ds``: the split parsed
        on the driver; its rows carry their records, the loader gets the reader)."""
        return {"reader": ds.reader_payload(), "num_classes": len(ds.classes.names)}

    def dataset(self, ds: Dataset, ids: list[str]):
        """The Ray Dataset of augmented training samples."""
        return loader_dataset(self.cfg, ds, ids, self.loader, **self.loader_kwargs(ds))

    # the network
    def network_spec(self, class_names: list[str]) -> dict[str, Any]:
        """The spec of the network trained (``create_network(kind, **spec)``), from the config."""
        raise NotImplementedError

    def build(self, class_names: list[str], weights: Any) -> torch.nn.Module:
        """The module trained (with ``param_groups(lr, head_lr_mult, weight_decay)``)."""
        return create_network(self.kind, weights, **self.network_spec(class_names))

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        """What a checkpoint keeps of the trained module."""
        return module

    def spec(self, module: torch.nn.Module) -> dict[str, Any]:
        """Checkpoint entries, besides the weights, that rebuild the network with no config at hand."""
        return {self.kind: self.network(module).spec}

    def load(self, uri: str, options: StorageOptions | None) -> tuple[torch.nn.Module, list[str]]:
        """(network in eval mode, class names) from a checkpoint folder."""
        return load_network(uri, options, self.kind)

    def losses(self, module: torch.nn.Module, batch: dict[str, torch.Tensor], iteration: int,
               device: torch.device) -> dict[str, torch.Tensor]:
        """The loss terms of one batch; ``loss`` is what is minimised."""
        raise NotImplementedError

    # validation and the preview
    def val_ids(self, config: dict[str, Any]) -> list[str]:
        return config["val_ids"]

    def val_masker(self, net: torch.nn.Module, ds, device: torch.device,
                   final: bool) -> Callable[[Row], dict[str, torch.Tensor]]:
        """row -> {prefix of ``val_outputs``: predicted mask [H, W]} for the network in hand (``ds``:
        the val split; ``final``: the run's last scoring)."""
        raise NotImplementedError

    @torch.no_grad()
    def validation(self, module: torch.nn.Module, ds, config: dict[str, Any], device: torch.device,
                   final: bool) -> dict[str, float]:
        """Val metrics (``<prefix>_miou`` and ``<prefix>_iou/<class>`` per val output); ``ds`` None: {}."""
        if ds is None:
            return {}
        net, names = self.network(unwrap(module)), config["class_names"]
        net.eval()
        masks = self.val_masker(net, ds, device, final)
        # every output's matrix on every worker, whatever its slice holds: the all-reduces must pair up
        cms = {prefix: ConfusionMatrix(len(names)) for prefix in self.val_outputs}
        for image_id in my_slice(self.val_ids(config)):
            row = ds.load(image_id)
            for prefix, mask in masks(row).items():
                cms[prefix].update(mask, row.mask)
        net.train()
        return {k: v for prefix, cm in cms.items() for k, v in iou_metrics(all_reduce(cm, device), names, prefix).items()}

    def preview_panels(self, net: torch.nn.Module, ds) -> Callable[[Row], list[Panel]]:
        """row -> the preview's panels for it, for the network in hand (on CPU; ``ds``: the training split)."""
        raise NotImplementedError

    def preview(self, net: torch.nn.Module, ds) -> bytes:
        """A PNG of what the network does on the first ``tracking.preview_images`` training images."""
        panels_of = self.preview_panels(unwrap(net), ds)
        return panels([(i, panels_of(ds.load(i))) for i in ds.ids[: self.cfg.tracking.preview_images]])


def _builtins() -> None:
    for module in BUILTIN:
        importlib.import_module(module)  # each registers its recipe; a no-op after the first time


def recipe_names() -> list[str]:
    _builtins()
    return list(RECIPES)


def recipe_class(name: str) -> type[Recipe]:
    _builtins()
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown training recipe {name!r}; known: {', '.join(RECIPES)}") from None


def recipe_for(cfg: TrainBase) -> Recipe:
    """The recipe object of a config (its class's ``recipe`` name)."""
    return recipe_class(type(cfg).recipe)(cfg)

"""Training data with Ray Data: the split's ids -> loader tasks (read the image and its pseudo mask +
confidence from a ``wsss label`` output, or its ground truth) -> random scale / crop / flip -> one
fixed-size sample per row, streamed to the workers (``ray.train.get_dataset_shard("train")``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from wsss_core.augment import random_scale_crop_flip
from wsss_platform import storage
from wsss_platform.datasets import DatasetConfig, open_dataset
from wsss_platform.datasets.base import DatasetError, decode_mask
from wsss_platform.label import outputs
from wsss_platform.train.config import TrainConfig


def uses_ground_truth(cfg: TrainConfig) -> bool:
    return cfg.train.pseudo_masks.strip().lower() == "none"


def read_label_png(uri: str, options) -> np.ndarray:
    """A pseudo mask or confidence PNG of a labeling output; one that does not decode is named, with the fix."""
    try:
        return decode_mask(storage.read_bytes(uri, options), uri)
    except DatasetError as e:
        raise DatasetError(f"{e}: {outputs.DAMAGED}") from None


class SampleLoader:
    """Ray Data callable: image ids -> augmented (image, mask, confidence) crops."""

    def __init__(self, dataset: dict[str, Any], train: dict[str, Any], pseudo_masks: str | None) -> None:
        cfg = DatasetConfig.model_validate(dataset)
        self.ds, self.opts = open_dataset(cfg), cfg.storage
        self.train, self.pseudo = train, pseudo_masks
        self.rng = np.random.default_rng()  # a new view every epoch: Ray Data reruns the map each pass

    def _png(self, uri: str) -> np.ndarray:
        return read_label_png(uri, self.opts)

    def sample(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = self.ds.load(image_id)
        if self.pseudo is None:
            if row.mask is None:
                raise ValueError(f"{image_id}: no ground-truth mask to train on (train.pseudo_masks: none)")
            mask, conf = row.mask, np.full(row.mask.shape, 255, np.uint8)
        else:
            mask = self._png(outputs.pseudo_uri(self.pseudo, image_id))
            conf = self._png(outputs.confidence_uri(self.pseudo, image_id))
        t = self.train
        return random_scale_crop_flip(row.image, mask, conf, t["crop_size"], tuple(t["scale_range"]), self.rng, t["flip"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, masks, confs = zip(*(self.sample(str(i)) for i in batch["image_id"]), strict=True)
        return {"image": np.stack(images), "mask": np.stack(masks), "confidence": np.stack(confs)}


def check_pseudo_masks(cfg: TrainConfig, ids: list[str], names: list[str]) -> None:
    """Fail on the driver when the label output lacks what training reads, or was labelled for other
    classes (named, with the fix)."""
    if uses_ground_truth(cfg):
        return
    root, opts = cfg.train.pseudo_masks, cfg.dataset.storage
    if not root:
        raise ValueError("train.pseudo_masks: give a `wsss label` output (--pseudo-masks URI), or none to train "
                         "on the ground truth")
    for folder in ("pseudo", "confidence"):
        outputs.check_files(root, folder, ".png", ids, "train.pseudo_masks", opts)
    outputs.check_classes(root, names, "train.pseudo_masks", opts)


def train_dataset(cfg: TrainConfig, ids: list[str], dataset_payload: dict[str, Any]):
    import ray

    pseudo = None if uses_ground_truth(cfg) else cfg.train.pseudo_masks
    items = ray.data.from_items([{"image_id": i} for i in ids], override_num_blocks=max(1, min(len(ids), 64)))
    return items.map_batches(SampleLoader, batch_size=8, num_cpus=cfg.compute.loader_cpus,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.compute.loader_actors),
                             fn_constructor_kwargs={"dataset": dataset_payload, "train": cfg.train.model_dump(mode="json"),
                                                    "pseudo_masks": pseudo})


def feature_dataset(cfg: TrainConfig, ids: list[str], dataset_payload: dict[str, Any], features_uri: str):
    """Crops of the cached features and their labels (``features.FeatureSampleLoader``)."""
    import ray

    from wsss_platform.train.features import FeatureSampleLoader

    pseudo = None if uses_ground_truth(cfg) else cfg.train.pseudo_masks
    items = ray.data.from_items([{"image_id": i} for i in ids], override_num_blocks=max(1, min(len(ids), 64)))
    return items.map_batches(FeatureSampleLoader, batch_size=8, num_cpus=cfg.compute.loader_cpus,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.compute.loader_actors),
                             fn_constructor_kwargs={"dataset": dataset_payload, "train": cfg.train.model_dump(mode="json"),
                                                    "pseudo_masks": pseudo, "uri": features_uri})

"""Training data with Ray Data: the split's ids -> loader tasks (read the image and its pseudo mask +
confidence from a ``wsss label`` output, or its ground truth) -> random scale / crop / flip -> one
fixed-size sample per row, streamed to the workers (``ray.train.get_dataset_shard("train")``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from wsss_core.augment import random_scale_crop_flip
from wsss_platform import outputs, storage
from wsss_platform.datasets import RecordReader
from wsss_platform.datasets.base import DatasetError, decode_mask
from wsss_platform.datasets.index import decode_record
from wsss_platform.ray_utils import record_items
from wsss_platform.train.config import TrainBase, TrainConfig


def uses_ground_truth(cfg: TrainConfig) -> bool:
    return cfg.train.pseudo_masks.strip().lower() == "none"


def read_label_png(uri: str, options) -> np.ndarray:
    """A pseudo mask or confidence PNG of a labeling output; one that does not decode is named, with the fix."""
    try:
        return decode_mask(storage.read_bytes(uri, options), uri)
    except DatasetError as e:
        raise DatasetError(f"{e}: {outputs.DAMAGED}") from None


def read_labels(row, pseudo_masks: str | None, options) -> tuple[np.ndarray, np.ndarray]:
    """(mask, confidence) a training reads for a dataset row: its pseudo mask and confidence from the
    ``wsss label`` output ``pseudo_masks``, or (None) its ground truth at full confidence."""
    if pseudo_masks is None:
        if row.mask is None:
            raise ValueError(f"{row.image_id}: no ground-truth mask to train on (train.pseudo_masks: none)")
        return row.mask, np.full(row.mask.shape, 255, np.uint8)
    return (read_label_png(outputs.pseudo_uri(pseudo_masks, row.image_id), options),
            read_label_png(outputs.confidence_uri(pseudo_masks, row.image_id), options))


def rows_of(batch: dict[str, np.ndarray]):
    """(image id, record) of each row of a batch of ``record_items``."""
    return zip((str(i) for i in batch["image_id"]), batch["record"], strict=True)


def load_batch(batch: dict[str, np.ndarray], loader: type, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    """One Ray Data task: ``loader(**kwargs)`` built and applied to ``batch``."""
    return loader(**kwargs)(batch)


def loader_dataset(cfg: TrainBase, ds, ids: list[str], loader: type, **kwargs: Any):
    """``loader`` (a callable of (image id, record) rows -> samples, built with the ``train`` section and
    ``kwargs``) over ``ids`` of the split ``ds``, in up to ``compute.loader_tasks`` Ray Data tasks of
    ``loader_cpus``."""
    # Tasks, not an actor pool: every epoch reruns the pipeline, and a new actor pool costs each epoch
    # seconds of imports per actor, while a loader is built in under a millisecond and tasks run in
    # Ray's warm workers.
    return record_items(ds, ids).map_batches(
        load_batch, batch_size=8, num_cpus=cfg.compute.loader_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.compute.loader_tasks),
        fn_kwargs={"loader": loader, "kwargs": {"train": cfg.train.model_dump(mode="json"), **kwargs}})


class SampleLoader:
    """Ray Data callable: image rows -> augmented (image, mask, confidence) crops."""

    def __init__(self, reader: dict[str, Any], train: dict[str, Any], pseudo_masks: str | None) -> None:
        self.reader = RecordReader(reader)
        self.opts, self.train, self.pseudo = self.reader.options, train, pseudo_masks
        self.rng = np.random.default_rng()  # fresh entropy per batch: a new view every epoch

    def sample(self, image_id: str, record: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = self.reader.load(record)
        mask, conf = read_labels(row, self.pseudo, self.opts)
        t = self.train
        return random_scale_crop_flip(row.image, mask, conf, t["crop_size"], tuple(t["scale_range"]), self.rng, t["flip"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, masks, confs = zip(*(self.sample(i, r) for i, r in rows_of(batch)), strict=True)
        return {"image": np.stack(images), "mask": np.stack(masks), "confidence": np.stack(confs)}


def check_ground_truth(cfg: TrainConfig, ds) -> None:
    """Fail on the driver when an image of the split ``ds`` has no ground-truth mask to train on (VOC's
    ``train_aug`` has 1,464 of its 10,582 in ``SegmentationClass/``, all in ``SegmentationClassAug/``)."""
    missing = [i for i in ds.ids if decode_record(ds.record(i)).get("mask") is False]
    if missing:
        raise ValueError(f"train.pseudo_masks: none trains on the ground truth, but {len(missing)} of {len(ds.ids)} "
                         f"images of split {cfg.dataset.split} have no mask in {storage.join(ds.uri, cfg.dataset.masks_dir)}"
                         f" (e.g. {missing[0]}.png): set dataset.masks_dir to where they are (train_aug: "
                         "SegmentationClassAug), or train on a `wsss label` output (--pseudo-masks URI)")


def check_pseudo_masks(cfg: TrainConfig, ids: list[str], names: list[str]) -> None:
    """Fail on the driver when the label output lacks what training reads, or was labelled for other
    classes (named, with the fix)."""
    root, opts = cfg.train.pseudo_masks, cfg.dataset.storage
    if not root:
        raise ValueError("train.pseudo_masks: give a `wsss label` output (--pseudo-masks URI), or none to train "
                         "on the ground truth")
    for folder in ("pseudo", "confidence"):
        outputs.check_files(root, folder, ".png", ids, "train.pseudo_masks", opts)
    outputs.check_classes(root, names, "train.pseudo_masks", opts)

"""``wsss train affinity``: PSA's AffinityNet on the CAMs of a labeling output (the recipe).

Data: each training image with its cached CAMs (``cams/<id>.npz`` of a ``wsss label`` output, any CAM
source), upsampled to the image, made into confident regions (two background powers, optionally a
CRF: ``wsss_core.refine.affinity_labels``) and scaled / cropped / flipped with the image, in Ray Data
actors. Step: AffinityNet's features, the pair affinities within the radius, and the three-term loss
against the regions' pair labels on the feature grid. Validation: the first ``eval_images`` of
``val_split`` (a split the CAMs cover): masks from the raw CAMs (background ``(1 − max)^alpha``) and
from the random-walked ones, against the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.augment import random_scale_crop_flip
from wsss_core.losses.affinity import affinity_loss
from wsss_core.maps import upsample
from wsss_core.pairs import pair_affinity, radius_offsets
from wsss_core.pipeline import PseudoMasker
from wsss_core.refine.affinity_labels import confident_regions, pair_labels_in_radius
from wsss_core.refine.random_walk import RandomWalk
from wsss_core.types import CamOutput
from wsss_platform import outputs, storage
from wsss_platform.datasets import RecordReader
from wsss_platform.datasets.base import DatasetError, Row
from wsss_platform.preview import colour, heatmap
from wsss_platform.storage import StorageOptions
from wsss_platform.train.config import AffinityConfig, TrainBase
from wsss_platform.train.data import rows_of
from wsss_platform.train.evaluate import unwrap
from wsss_platform.train.recipes import Panel, Recipe


def cam_output(cams_root: str, image_id: str, options: StorageOptions | None) -> CamOutput:
    """An image's cached CAMs [K, h, w] (float32) with their labels and class scores."""
    uri = outputs.cams_uri(cams_root, image_id)
    data = storage.read_bytes(uri, options)
    try:
        cache = outputs.decode_cams(data)
    except Exception as e:  # a truncated or foreign file: zip, npz and array errors alike
        raise DatasetError(f"cannot decode {uri}: {type(e).__name__}: {e}: {outputs.DAMAGED}") from None
    return CamOutput([int(c) for c in cache["labels"]], torch.from_numpy(cache["cams"].astype(np.float32)),
                     torch.from_numpy(cache["class_scores"]))


class CamRegionLoader:
    """Ray Data callable: image ids -> augmented crops and their confident regions (uint8, 255 ignored)."""

    def __init__(self, reader: dict[str, Any], train: dict[str, Any], num_classes: int) -> None:
        self.reader, self.train, self.num_classes = RecordReader(reader), train, num_classes
        self.opts = self.reader.options
        self.rng = np.random.default_rng()

    def regions(self, image_id: str, image: np.ndarray) -> np.ndarray:
        out, t = cam_output(self.train["cams"], image_id, self.opts), self.train
        full = torch.zeros(1, self.num_classes, *image.shape[:2])
        labels = torch.zeros(1, self.num_classes)
        idx = [c - 1 for c in out.labels]
        full[0, idx], labels[0, idx] = upsample(out.cams, image.shape[:2]), 1.0
        region = confident_regions(full, labels, t["alpha_low"], t["alpha_high"], image[None] if t["crf"] else None)
        return region[0].numpy().astype(np.uint8)

    def sample(self, image_id: str, record: bytes) -> tuple[np.ndarray, np.ndarray]:
        row = self.reader.load(record)
        region = self.regions(image_id, row.image)
        t = self.train
        image, region, _ = random_scale_crop_flip(row.image, region, np.zeros_like(region), t["crop_size"],
                                                  tuple(t["scale_range"]), self.rng, t["flip"])
        return image, region  # the crop's padding is 255: no pair there

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, regions = zip(*(self.sample(i, r) for i, r in rows_of(batch)), strict=True)
        return {"image": np.stack(images), "region": np.stack(regions)}


class AffinityRecipe(Recipe):
    name: ClassVar[str] = "affinity"
    config: ClassVar[type[TrainBase]] = AffinityConfig
    description: ClassVar[str] = "PSA's AffinityNet on the CAMs of a `wsss label` output (then refine: [random_walk])"
    score: ClassVar[str] = "val_rw_miou"
    kind: ClassVar[str] = "affinitynet"
    loader: ClassVar[type] = CamRegionLoader
    val_outputs: ClassVar[tuple[str, ...]] = ("val_cam", "val_rw")

    cfg: AffinityConfig

    def labels(self) -> str:
        return f"CAMs of {self.cfg.train.cams}"

    def absolute_train(self) -> dict[str, Any]:
        return {"cams": storage.absolute(self.cfg.train.cams) if self.cfg.train.cams else ""}

    def check(self, ds, val_ids: list[str]) -> None:
        """The CAMs exist for the split trained on and for the split scored, labelled for the dataset's
        classes (named, with the fix)."""
        t, opts = self.cfg.train, self.cfg.dataset.storage
        if not t.cams:
            raise ValueError("train.cams: give a `wsss label` output of this split (--cams URI); its cams/ hold the "
                             "CAMs AffinityNet learns from (any cam_source, cache: cams or full)")
        splits = [("dataset.split", self.cfg.dataset.split, ds.ids)]
        if t.val_split:
            splits.append(("train.val_split", t.val_split, val_ids[: t.eval_images]))
        have = set(storage.list_names(storage.join(t.cams, "cams"), opts))
        for key, split, split_ids in splits:
            missing = [i for i in split_ids if f"{i}.npz" not in have]
            if missing:
                raise ValueError(f"train.cams: {outputs.cams_uri(t.cams, missing[0])} not found ({key} {split}: "
                                 f"{len(missing)} of {len(split_ids)} images): label that split with cache: cams (or "
                                 f"full) into {t.cams}" + (", or set val_split to the labeled split (null: no scoring)"
                                                           if key == "train.val_split" else ""))
        outputs.check_classes(t.cams, list(ds.classes.names), "train.cams", opts)

    def network_spec(self, class_names: list[str]) -> dict[str, Any]:
        m = self.cfg.model
        return {"backbone": m.backbone, "depths": list(m.depths), "dims": list(m.dims), "output_stride": m.output_stride,
                "input_scale": m.input_scale, "class_names": list(class_names)}

    def losses(self, module: torch.nn.Module, batch: dict[str, torch.Tensor], iteration: int,
               device: torch.device) -> dict[str, torch.Tensor]:
        features = module(unwrap(module).normalize(batch["image"].to(device)))
        # PSA: the regions brought to the feature grid by nearest neighbour
        region = F.interpolate(batch["region"].to(device)[:, None].float(), size=features.shape[-2:], mode="nearest")
        r = self.cfg.train.radius
        terms = affinity_loss(pair_affinity(features, r), pair_labels_in_radius(region[:, 0].long(), r))
        return {"loss": terms.pop("total"), **{f"loss/{k}": v for k, v in terms.items()}}

    def walk(self, net: torch.nn.Module) -> PseudoMasker:
        """Raw-CAM and random-walk maskers with the schedule's settings, on the network in hand."""
        t = self.cfg.train
        refiner = RandomWalk.from_network(net, beta=t.beta, t=t.t, alpha=t.alpha, radius=t.radius)
        return PseudoMasker([refiner], bg_rule="power", bg_value=t.alpha, mu=0.0)

    def walked(self, masker: PseudoMasker, row: Row):
        return masker([cam_output(self.cfg.train.cams, row.image_id, self.cfg.dataset.storage)],
                      [row.image.shape[:2]], [row.image])[0]

    def val_ids(self, config: dict[str, Any]) -> list[str]:
        return config["val_ids"][: self.cfg.train.eval_images]

    def val_masker(self, net: torch.nn.Module, ds, device: torch.device,
                   final: bool) -> Callable[[Row], dict[str, torch.Tensor]]:
        masker = self.walk(net)

        def masks(row: Row) -> dict[str, torch.Tensor]:
            res = self.walked(masker, row)
            return {"val_cam": res.mask_raw, "val_rw": res.mask}
        return masks

    def preview_panels(self, net: torch.nn.Module, ds) -> Callable[[Row], list[Panel]]:
        """image | affinity to the 4 nearest neighbours (dark: an edge) | CAM mask | random walk | ground truth."""
        masker = self.walk(net)
        near = [radius_offsets(self.cfg.train.radius).index(o) for o in ((-1, 0), (0, -1), (0, 1), (1, 0))]

        def cells(row: Row) -> list[Panel]:
            pairs = masker.prob_refiners[0].affinity([row.image])[0]
            edges = upsample(pairs[near].mean(0).cpu(), row.image.shape[:2]).numpy()
            res = self.walked(masker, row)
            return [("image", row.image, False), ("affinity", heatmap(edges), False),
                    ("CAM mask", colour(res.mask_raw.numpy(), row.image), True),
                    ("random walk", colour(res.mask.numpy(), row.image), True),
                    ("ground truth", colour(row.mask, row.image), True)]
        return cells

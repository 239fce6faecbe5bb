"""Frozen-feature training of the segmenter (``model.freeze_backbone``): the backbone's features are
computed once per image by a Ray Data stage and cached; the head trains on them.

Cache layout: ``<train.feature_cache or output/features>/<key>/<image_id>.npz``, ``key`` the
fingerprint of what shapes the features (backbone, its weights' identity: a tag, or a file's URI,
size and ETag/mtime; random weights: their seed; ``feature_scale``; output stride). Each file holds
``features`` (float16 [D, h, w]), ``size`` (the resized image's H, W), ``stride`` (pixels per grid
cell) and ``digest`` (of the decoded image): an entry whose image changed is computed again; one
whose key and digest agree is reused.
Trainings with the same key (a sweep's trials over ``mu``, ``lr``, the head) share one cache.

Training samples are crops of the feature grid (``crop_size`` / stride cells, flipped), and the
labels (pseudo mask and confidence, or the ground truth) resized to the image's resized size and
cut to the same area. The logits are upsampled from the grid to the labels (not the labels pooled
to the grid, which would lose every boundary inside a cell), taken at one pixel in
``label_pitch`` each way (``Segmenter.decode``).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from wsss_core.models.networks import create_network
from wsss_platform import storage
from wsss_platform.checkpoint import resolve_weights
from wsss_platform.datasets import RecordReader
from wsss_platform.ownership import fingerprint
from wsss_platform.ray_utils import record_items
from wsss_platform.storage import StorageOptions
from wsss_platform.train.config import TrainConfig
from wsss_platform.train.data import read_labels, rows_of

IGNORE = 255


def weights_identity(pretrained: str, options: StorageOptions | None) -> dict[str, Any]:
    """What names a backbone's weights: a tag as it is; a file by URI, size and ETag or mtime (a
    rewritten file is other weights)."""
    from wsss_core.models.weights import looks_like_path

    if "://" not in pretrained and not looks_like_path(pretrained):
        return {"tag": pretrained}
    fs, path = storage.filesystem(pretrained, options)
    info = fs.info(path)
    return {"file": storage.absolute(pretrained), "size": info.get("size"),
            "version": str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))}


def cache_key(cfg: TrainConfig) -> str:
    m = cfg.model
    what = {"backbone": m.backbone, "weights": weights_identity(m.pretrained, cfg.dataset.storage),
            "scale": cfg.train.feature_scale, "output_stride": m.output_stride}
    if m.pretrained.lower() in ("", "none"):  # random weights: the seed makes them (see build_backbone)
        what["seed"] = cfg.train.seed
    return fingerprint(what)[:16]


def cache_uri(cfg: TrainConfig) -> str:
    return storage.join(cfg.train.feature_cache or storage.join(cfg.output, "features"), cache_key(cfg))


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:20]


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 [H, W, 3] resized by ``scale`` (bilinear; the image itself at 1)."""
    if scale == 1:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def segmenter_spec(cfg: TrainConfig, class_names: list[str]) -> dict[str, Any]:
    """The segmenter's ``create_network`` spec from the config (what its checkpoints store)."""
    m = cfg.model
    return {"backbone": m.backbone, "head": m.head, "output_stride": m.output_stride,
            "freeze_backbone": m.freeze_backbone, "class_names": list(class_names)}


def build_segmenter(cfg: TrainConfig, class_names: list[str], weights: Any) -> torch.nn.Module:
    """The segmenter a training builds. Seeded first, so that random weights (``pretrained: none``)
    are the same in the feature stage and in every worker."""
    torch.manual_seed(cfg.train.seed)
    return create_network("segmenter", weights, **segmenter_spec(cfg, class_names))


class FeatureWriter:
    """Ray Data callable: image ids -> their cached features written (or found); rows say which."""

    def __init__(self, cfg: dict[str, Any], class_names: list[str], uri: str, reader: dict[str, Any]) -> None:
        self.cfg = TrainConfig.model_validate(cfg)
        opts = self.cfg.dataset.storage
        self.reader, self.opts, self.uri = RecordReader(reader), opts, uri
        self.net = build_segmenter(self.cfg, class_names, resolve_weights(self.cfg.model.pretrained, opts)).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net.to(self.device)

    def _cached(self, path: str, digest: str) -> bool:
        if not storage.exists(path, self.opts):
            return False
        try:
            return str(np.load(io.BytesIO(storage.read_bytes(path, self.opts)))["digest"]) == digest
        except Exception:  # a damaged entry is computed again
            return False

    def one(self, image_id: str, record: bytes) -> bool:
        row = self.reader.load(record)
        path, digest = storage.join(self.uri, f"{image_id}.npz"), image_digest(row.image)
        if self._cached(path, digest):
            return False
        image = resized(row.image, self.cfg.train.feature_scale)
        pixels = self.net.normalize(torch.from_numpy(np.array(image))[None].to(self.device))
        feats = self.net.features(pixels)[0].to(torch.float16).cpu().numpy()
        buf = io.BytesIO()
        np.savez(buf, features=feats, size=np.array(image.shape[:2]), stride=np.array(self.net.backbone.stride),
                 digest=np.array(digest))
        storage.write_bytes(path, buf.getvalue(), self.opts)
        return True

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            computed = [self.one(i, r) for i, r in rows_of(batch)]
        return {"image_id": batch["image_id"], "computed": np.array(computed)}


def ensure_features(cfg: TrainConfig, ds, ids: list[str], class_names: list[str],
                    use_gpu: bool) -> tuple[str, int]:
    """Every image's features in the cache: (its URI, how many were computed now; the rest reused)."""
    uri = cache_uri(cfg)
    train_cfg = cfg.model_dump(mode="json") | {"dataset": cfg.dataset.worker_payload()}
    rows = record_items(ds, ids).map_batches(FeatureWriter, batch_size=8, num_gpus=1 if use_gpu else 0,
                             num_cpus=cfg.compute.cpus_per_worker,
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.compute.num_workers),
                             fn_constructor_kwargs={"cfg": train_cfg, "class_names": list(class_names), "uri": uri,
                                                    "reader": ds.reader_payload()})
    computed = sum(int(r["computed"]) for r in rows.iter_rows())
    return uri, computed


def crop_cells(feats: np.ndarray, labels: list[np.ndarray], cells: int, stride: int, pitch: int,
               rng: np.random.Generator, flip: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """A random ``cells``² window of the grid (zero features and ignored labels past its edge),
    flipped with probability 0.5 when ``flip``, and the labels' matching area at ``pitch``.

    Args:
        feats: [D, h, w]; labels: each [H, W] at the resized image's size (H ≤ h·stride).

    Returns:
        features [D, cells, cells] and each label [cells·stride/pitch, cells·stride/pitch].
    """
    d, h, w = feats.shape
    y0, x0 = int(rng.integers(0, max(0, h - cells) + 1)), int(rng.integers(0, max(0, w - cells) + 1))
    ch, cw = min(cells, h), min(cells, w)
    out = np.zeros((d, cells, cells), feats.dtype)
    out[:, :ch, :cw] = feats[:, y0:y0 + ch, x0:x0 + cw]
    side = cells * stride
    cut = []
    for lab in labels:
        full = np.full((side, side), IGNORE, np.uint8)
        part = lab[y0 * stride:(y0 + ch) * stride, x0 * stride:(x0 + cw) * stride]
        full[:part.shape[0], :part.shape[1]] = part
        cut.append(full)
    if flip and rng.random() < 0.5:
        out, cut = out[..., ::-1], [c[:, ::-1] for c in cut]
    # the centre of each pitch² cell, where the bilinear logits of Segmenter.decode sit
    at = np.minimum(np.arange(-(-side // pitch)) * pitch + pitch // 2, side - 1)
    return np.ascontiguousarray(out), [np.ascontiguousarray(c[np.ix_(at, at)]) for c in cut]


class FeatureSampleLoader:
    """Ray Data callable: image ids -> (cached features, mask, confidence) crops of the grid."""

    def __init__(self, reader: dict[str, Any], train: dict[str, Any], pseudo_masks: str | None, uri: str) -> None:
        self.reader = RecordReader(reader)
        self.opts = self.reader.options
        self.train, self.pseudo, self.uri = train, pseudo_masks, uri
        self.rng = np.random.default_rng()

    def _labels(self, record: bytes, size: tuple[int, int]) -> list[np.ndarray]:
        labels = list(read_labels(self.reader.load(record), self.pseudo, self.opts))
        if labels[0].shape != tuple(size):  # nearest: labels are classes, confidences are read per pixel
            labels = [np.asarray(Image.fromarray(lab).resize(size[::-1], Image.NEAREST)) for lab in labels]
        return labels

    def sample(self, image_id: str, record: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        entry = np.load(io.BytesIO(storage.read_bytes(storage.join(self.uri, f"{image_id}.npz"), self.opts)))
        t, stride = self.train, int(entry["stride"])
        feats, (mask, conf) = crop_cells(entry["features"], self._labels(record, tuple(entry["size"])),
                                         max(1, t["crop_size"] // stride), stride, t["label_pitch"], self.rng, t["flip"])
        return feats, mask, conf

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats, masks, confs = zip(*(self.sample(i, r) for i, r in rows_of(batch)), strict=True)
        return {"features": np.stack(feats), "mask": np.stack(masks), "confidence": np.stack(confs)}


class FrozenHead(torch.nn.Module):
    """What the workers train on cached features: ``forward(features) -> logits`` at the label pitch,
    through the segmenter's own head (DDP needs the step to go through the wrapped module's forward)."""

    def __init__(self, segmenter: torch.nn.Module, pitch: int) -> None:
        super().__init__()
        self.segmenter, self.pitch = segmenter, pitch

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.segmenter.decode(features, self.pitch)

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        return self.segmenter.param_groups(lr, head_lr_mult, weight_decay)

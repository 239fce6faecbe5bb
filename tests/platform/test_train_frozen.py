"""Frozen-feature training of the segmenter (``model.freeze_backbone``): the feature cache's
fingerprint, a backbone that learns nothing, and a model that `wsss predict` runs unchanged."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from wsss_core.models.clip import create_clip
from wsss_platform import storage
from wsss_platform.checkpoint import load_state
from wsss_platform.config import build_config
from wsss_platform.datasets import DatasetConfig, open_dataset
from wsss_platform.predict.config import PredictConfig
from wsss_platform.predict.job import run_predict
from wsss_platform.train import features
from wsss_platform.train.config import TrainConfig
from wsss_platform.train.evaluate import segment
from wsss_platform.train.job import run_train

FROZEN = ["model.backbone=open_clip:tiny", "model.pretrained=none", "model.head=conv", "model.freeze_backbone=true",
          "train.batch_size=4", "train.crop_size=64", "train.lr=0.01", "train.optimizer=adamw",
          "compute.cpus_per_worker=0.5", "tracking.enabled=false"]


def _cfg(labelled, out, *extra: str) -> TrainConfig:
    return build_config(TrainConfig, {}, [f"dataset.uri={labelled / 'voc'}", f"output={out}",
                                          f"train.pseudo_masks={labelled / 'labels'}", *FROZEN, *extra])


def test_head_on_features_matches_the_whole_network_and_labels_line_up():
    """decode() of a ViT's features is forward() on the image (padded area cut off); crop_cells cuts the
    labels under the cells it cuts, sampled where decode's logits sit."""
    from wsss_core.models.segmenter import create_segmenter

    torch.manual_seed(0)
    net = create_segmenter("open_clip:tiny", 4, None, "conv", freeze_backbone=True).eval()
    pixels = torch.randn(1, 3, 40, 56)
    assert torch.allclose(net.decode(net.features(pixels))[..., :40, :56], net(pixels), atol=1e-5)
    assert net.decode(net.features(pixels), pitch=4).shape[-2:] == (12, 16)  # grid 3×4 cells of 16 px

    feats = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    label = np.arange(40 * 56).reshape(40, 56).astype(np.uint8) % 250
    rng = np.random.default_rng(0)
    for _ in range(20):
        f, (lab,) = features.crop_cells(feats, [label], 2, 16, 4, rng, flip=True)
        assert f.shape == (2, 2, 2) and lab.shape == (8, 8)
        flipped = f[0, 0, 0] > f[0, 0, 1]
        cell = f[0, 0, 1] if flipped else f[0, 0, 0]  # the crop's first cell, as it was before the flip
        y0, x0 = divmod(int(cell), 4)
        expect = np.full((32, 32), 255, np.uint8)
        part = label[y0 * 16:(y0 + 2) * 16, x0 * 16:(x0 + 2) * 16]
        expect[:part.shape[0], :part.shape[1]] = part
        expect = expect[:, ::-1] if flipped else expect
        assert (lab == expect[2::4, 2::4]).all()


NAMES = ["background", *(f"class{i}" for i in range(1, 11))]  # the demo's 10 classes; only their number matters


def _weights_file(path) -> str:
    torch.manual_seed(1)
    model, _ = create_clip("tiny", None)
    torch.save(model.state_dict(), path)
    return str(path)


def test_the_feature_cache_is_reused_and_recomputed_when_what_shapes_it_changes(labelled, tmp_path, ray_local):
    ds = open_dataset(DatasetConfig(uri=str(labelled / "voc")))
    ids = list(ds.ids)
    weights = _weights_file(tmp_path / "tiny.pt")
    cache = f"train.feature_cache={tmp_path / 'cache'}"

    def run(*extra: str) -> tuple[str, int]:
        return features.ensure_features(_cfg(labelled, tmp_path / "out", cache, *extra), ds, ids, NAMES, False)

    uri, computed = run(f"model.pretrained={weights}")
    assert computed == len(ids) and sorted(storage.list_names(uri)) == sorted(f"{i}.npz" for i in ids)
    entry = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, f"{ids[0]}.npz"))))
    assert entry["features"].dtype == np.float16 and entry["features"].shape[0] == 192 and int(entry["stride"]) == 16
    assert run(f"model.pretrained={weights}") == (uri, 0)  # the same: every entry reused
    assert run(f"model.pretrained={weights}", "train.mu=0.5", "train.lr=0.1", "model.head=aspp") == (uri, 0)

    scaled, n = run(f"model.pretrained={weights}", "train.feature_scale=0.5")
    assert scaled != uri and n == len(ids)
    half = np.load(io.BytesIO(storage.read_bytes(storage.join(scaled, f"{ids[0]}.npz"))))
    assert tuple(half["size"]) == tuple(round(s / 2) for s in entry["size"])

    other, n = run("model.pretrained=none")  # another backbone's weights
    assert other not in (uri, scaled) and n == len(ids)
    _weights_file(tmp_path / "tiny.pt")  # the same file written again: a new mtime, other weights for all we know
    rewritten, n = run(f"model.pretrained={weights}")
    assert rewritten != uri and n == len(ids)

    image = labelled / "voc" / "JPEGImages" / f"{ids[0]}.jpg"  # one image changed under the same key
    original = image.read_bytes()
    try:
        with Image.open(image) as im:
            Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(image)
        assert run(f"model.pretrained={weights}") == (rewritten, 1)
    finally:
        image.write_bytes(original)
    assert run(f"model.pretrained={weights}") == (rewritten, 1)


@pytest.mark.slow
def test_a_frozen_backbone_learns_nothing_and_predict_gives_the_training_network_s_masks(labelled, tmp_path,
                                                                                        ray_local):
    out = tmp_path / "seg"
    lines: list[str] = []
    summary = run_train(_cfg(labelled, out, "train.iterations=6", "train.checkpoint_every=6", "train.eval_every=6",
                             "compute.num_workers=2"), log=lines.append)
    assert summary.iterations == 6 and summary.val_miou is not None
    assert any("features: 16 computed, 0 reused" in ln for ln in lines), lines
    state = load_state(summary.checkpoint)
    cfg = _cfg(labelled, out)
    initial = features.build_segmenter(cfg, NAMES, None)  # what the feature stage and every worker built
    trained = {k: v for k, v in state["model"].items()}
    for k, v in initial.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(trained[k], v), k  # bit-identical: no gradient, no optimiser step
    head = [k for k in trained if k.startswith("head.")]
    assert head and any(not torch.equal(trained[k], initial.state_dict()[k]) for k in head)
    assert all(g["params"] for g in initial.param_groups(0.1)) and len(initial.param_groups(0.1)) == 1

    again: list[str] = []  # a longer schedule continues and reuses every feature
    run_train(_cfg(labelled, out, "train.iterations=8", "train.checkpoint_every=8", "train.eval_every=8",
                   "compute.num_workers=1"), log=again.append)
    assert any("features: 0 computed, 16 reused" in ln for ln in again), again

    pred = tmp_path / "pred"
    done = run_predict(build_config(PredictConfig, {}, [f"checkpoint={out}", f"dataset.uri={labelled / 'voc'}",
                                                        "dataset.split=val", f"output={pred}", "tracking.enabled=false"]))
    initial.load_state_dict(load_state(done.checkpoint)["model"])
    ds = open_dataset(DatasetConfig(uri=str(labelled / "voc"), split="val"))
    for image_id in ds.ids:
        expected = segment(initial.eval(), ds.load(image_id).image, torch.device("cpu")).argmax(0).numpy()
        with Image.open(pred / "masks" / f"{image_id}.png") as im:
            assert (np.asarray(im) == expected).all(), image_id

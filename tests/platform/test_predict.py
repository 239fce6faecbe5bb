"""`wsss predict`: a trained segmenter over a split with Ray Data, masks written and scored, local and S3."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from wsss_core.metrics import ConfusionMatrix
from wsss_platform import storage
from wsss_platform.cli import main
from wsss_platform.config import ConfigError, build_config
from wsss_platform.datasets import DatasetConfig, open_dataset
from wsss_platform.datasets.demo import write_demo_dataset
from wsss_platform.predict.config import PredictConfig
from wsss_platform.predict.job import run_predict
from wsss_platform.train.config import TrainConfig
from wsss_platform.train.job import run_train

from .test_train import TINY_TRAIN


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local):
    """A demo VOC dataset and a segmenter trained 2 iterations on its ground truth."""
    root = tmp_path_factory.mktemp("predict")
    write_demo_dataset(str(root / "voc"), "voc", 12, seed=8)
    summary = run_train(build_config(TrainConfig, {}, [
        f"dataset.uri={root / 'voc'}", f"output={root / 'seg'}", "train.pseudo_masks=none", *TINY_TRAIN,
        "compute.num_workers=1", "train.iterations=2", "train.checkpoint_every=2", "train.eval_every=2",
        "tracking.enabled=false"]))
    return root, summary.checkpoint


def _png(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return np.asarray(im)


def _check_output(out: str, dataset: str, summary) -> None:
    """Every image has its mask and confidence; the reported mIoU is the written masks' against the truth."""
    ds = open_dataset(DatasetConfig(uri=dataset, split="val"))
    cm = ConfusionMatrix(11)
    for image_id in ds.ids:
        row = ds.load(image_id)
        mask = _png(storage.join(out, "masks", f"{image_id}.png"))
        conf = _png(storage.join(out, "confidence", f"{image_id}.png"))
        assert mask.shape == conf.shape == row.mask.shape and mask.max() < 11
        assert conf.min() >= round(255 / 11) - 1  # the top class's softmax is at least 1/11
        cm.update(mask, row.mask)
    assert summary.done == len(ds.ids) and summary.failed == 0
    assert summary.miou == pytest.approx(cm.miou(), abs=1e-9)
    assert storage.exists(storage.join(out, "manifest.parquet")) and storage.exists(storage.join(out, "run.json"))


def test_predict_writes_masks_scores_them_and_logs_a_run(trained, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, checkpoint = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = str(tmp_path / "pred")
    # the training output (not a checkpoint folder) picks its latest checkpoint
    summary = run_predict(build_config(PredictConfig, {}, [
        f"checkpoint={root / 'seg'}", f"dataset.uri={root / 'voc'}", "dataset.split=val", f"output={out}",
        "scales=[0.75,1.0]", "flip=true"]))
    assert summary.checkpoint == checkpoint
    _check_output(out, str(root / "voc"), summary)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary.run_id)
    assert run.data.metrics["miou"] == pytest.approx(summary.miou)
    assert run.data.tags["wsss.checkpoint"] == checkpoint and run.data.params["flip"] == "True"
    assert {"preview.png", "per_class_iou.json"} <= {a.path for a in client.list_artifacts(summary.run_id)}
    # a prediction goes to review like a labeling: its masks/ exactly, its classes, the table on its run
    from pycocotools import mask as mask_utils

    assert main(["export", "--from", out, "--format", "coco", "--output", str(tmp_path / "review")]) == 0
    results = json.loads((tmp_path / "review" / "results.json").read_text())
    cats = {c["id"]: c["name"] for c in json.loads((tmp_path / "review" / "categories.json").read_text())}
    val = open_dataset(DatasetConfig(uri=str(root / "voc"), split="val"))
    assert list(cats.values()) == list(val.classes.names)
    for r in results:
        mask = _png(storage.join(out, "masks", f"{r['image_id']}.png"))
        on = mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
        assert np.array_equal(on.astype(bool), mask == r["category_id"])
    assert results and {r["image_id"] for r in results} <= set(val.ids)
    assert any(a.path.startswith("review-") for a in client.list_artifacts(summary.run_id))


@pytest.mark.slow
def test_predict_on_s3_end_to_end(trained, s3_bucket, monkeypatch, tmp_path):
    import s3fs

    root, checkpoint = trained
    data, ckpt, out = f"{s3_bucket}/voc", f"{s3_bucket}/ckpt", f"{s3_bucket}/pred"
    fs = s3fs.S3FileSystem()
    fs.put(str(root / "voc") + "/", data.removeprefix("s3://") + "/", recursive=True)
    fs.put(checkpoint + "/", ckpt.removeprefix("s3://") + "/", recursive=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["predict", "--checkpoint", ckpt, "--dataset", data, "--split", "val", "--output", out,
                 "tracking.enabled=false"]) == 0
    ds = open_dataset(DatasetConfig(uri=data, split="val"))
    assert sorted(storage.list_names(storage.join(out, "masks"))) == sorted(f"{i}.png" for i in ds.ids)


def test_predict_refuses_what_cannot_work(trained, tmp_path):
    root, checkpoint = trained
    base = [f"dataset.uri={root / 'voc'}", f"output={tmp_path / 'p'}", "tracking.enabled=false"]
    with pytest.raises(ValueError, match=r"--checkpoint: no checkpoint.pt in .* nor a checkpoint_\* folder"):
        run_predict(build_config(PredictConfig, {}, [*base, f"checkpoint={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"checkpoint: give a `wsss train` checkpoint"):
        run_predict(build_config(PredictConfig, {}, base))
    write_demo_dataset(str(tmp_path / "voc3"), "voc", 4, seed=2)
    (tmp_path / "voc3" / "classes.txt").write_text("dog\ncat\n")  # other classes than the segmenter's
    with pytest.raises(ConfigError, match=r"predicts 10 classes .* has 2"):
        run_predict(build_config(PredictConfig, {}, [f"checkpoint={checkpoint}", f"dataset.uri={tmp_path / 'voc3'}",
                                                     f"output={tmp_path / 'p'}", "tracking.enabled=false"]))

"""The split parsed once per job (the per-image index), and VOC as the WSSS literature uses it."""

import io
import json
import os
from urllib.parse import urlparse

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wsss_core.metrics import ConfusionMatrix
from wsss_platform import outputs, storage
from wsss_platform.config import ConfigError, build_config
from wsss_platform.datasets import DatasetConfig, keep_index, open_dataset, open_indexed, read_index
from wsss_platform.datasets.check import check_dataset
from wsss_platform.datasets.demo import generate, write_demo_dataset
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label

TINY = ["model.name=tiny", "model.pretrained=none", "refine=[]", "tracking.enabled=false", "cache=none"]


def _png(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return np.asarray(im)


def test_coco_annotations_are_read_once_per_job_and_a_changed_file_is_refused(s3_bucket, s3_requests, ray_local):
    """Two labeling actors on a real local Ray, COCO on a real S3 API: the instances JSON is fetched
    once (by the driver) in the first run and never in a rerun (its index is read instead); a changed
    file is another labeling, refused as changed settings are."""
    data, out = f"{s3_bucket}/coco", f"{s3_bucket}/labels"
    write_demo_dataset(data, "coco", 10, seed=2)
    key = urlparse(f"{data}/annotations/instances_train.json")
    path = f"/{key.netloc}{key.path}"
    args = [f"dataset.uri={data}", "dataset.layout=coco", f"output={out}", *TINY, "compute.min_actors=2",
            "compute.max_actors=2", "compute.cpus_per_actor=0.5", "compute.batch_size=1", "compute.loader_batch_size=1"]
    before = s3_requests("GET", path)
    summary = run_label(build_config(LabelConfig, {}, args), log=lambda s: None)
    assert summary.done == 8 and summary.failed == 0
    assert s3_requests("GET", path) - before == 1  # the driver's parse; no actor opened it
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/manifest.parquet")))
    assert len(set(manifest.column("worker").to_pylist())) == 2  # both actors labelled
    index = storage.list_names(f"{out}/{outputs.INDEX}")
    assert len(index) == 1 and index[0].startswith("train-") and index[0].endswith(".parquet")
    first = {i: _png(outputs.mask_uri(out, i)) for i in open_dataset(DatasetConfig(uri=data, layout="coco")).ids}

    before = s3_requests("GET", path)
    again = run_label(build_config(LabelConfig, {}, [*args, "overwrite=true"]), log=lambda s: None)
    assert again.done == 8 and s3_requests("GET", path) == before  # the index, not the JSON
    for image_id, mask in first.items():
        np.testing.assert_array_equal(_png(outputs.mask_uri(out, image_id)), mask)

    doc = json.loads(storage.read_bytes(f"{data}/annotations/instances_train.json"))
    doc["annotations"] = doc["annotations"][1:]  # one instance fewer: other ground truth, maybe other labels
    storage.write_text(f"{data}/annotations/instances_train.json", json.dumps(doc))
    with pytest.raises(ConfigError, match=r"other settings \(changed: dataset\.annotations"):
        run_label(build_config(LabelConfig, {}, args), log=lambda s: None)


def test_a_worker_reads_only_its_records(tmp_path):
    """The index read back for a slice holds that slice's records only, and they load the same rows."""
    write_demo_dataset(str(tmp_path / "coco"), "coco", 12, seed=7)
    cfg = DatasetConfig(uri=str(tmp_path / "coco"), layout="coco")
    full, uri = open_indexed(cfg, str(tmp_path / "index"))
    assert not os.path.exists(uri)  # written by a job once its checks pass
    keep_index(full, uri)
    part = read_index(uri, ids=full.ids[1:3])
    assert set(part.records_by_id) == set(full.ids[1:3])
    fresh = open_dataset(cfg)
    for image_id in full.ids[1:3]:
        a, b = part.load(image_id), fresh.load(image_id)
        assert a.labels == b.labels and np.array_equal(a.mask, b.mask) and np.array_equal(a.image, b.image)
    # `limit` and the size cap are the job's; the index keeps the whole split
    small, same = open_indexed(cfg.model_copy(update={"limit": 3}), str(tmp_path / "index"))
    assert same == uri and small.ids == full.ids[:3]


def test_voc_train_aug_with_segmentation_class_aug_labels_checks_and_scores(tmp_path, ray_local):
    """``split: train_aug`` + ``masks_dir: SegmentationClassAug`` (single-channel PNGs): `data check`
    counts its masks, and labeling scores its pseudo masks against them exactly."""
    root = str(tmp_path / "voc")
    splits = write_demo_dataset(root, "voc", 12, seed=8, voc_aug=True)
    assert set(splits) == {"train_aug", "val"}
    assert Image.open(os.path.join(root, "SegmentationClassAug", f"{splits['train_aug'][0]}.png")).mode == "L"
    aug = DatasetConfig(uri=root, split="train_aug", masks_dir="SegmentationClassAug")
    report = check_dataset(aug)
    assert report.ok and report.num_masks == len(splits["train_aug"]) == report.num_images
    assert check_dataset(aug.model_copy(update={"masks_dir": "SegmentationClass"})).num_masks == 0

    out = str(tmp_path / "labels")
    summary = run_label(build_config(LabelConfig, {}, [f"dataset.uri={root}", "dataset.split=train_aug",
                                                       "dataset.masks_dir=SegmentationClassAug", f"output={out}",
                                                       *TINY]), log=lambda s: None)
    assert summary.done == len(splits["train_aug"]) and summary.miou is not None
    cm = ConfusionMatrix(11)
    for image_id in splits["train_aug"]:
        cm.update(_png(outputs.pseudo_uri(out, image_id)), _png(os.path.join(root, "SegmentationClassAug",
                                                                             f"{image_id}.png")))
    assert abs(cm.miou() - summary.miou) < 1e-9


def test_ids_without_an_xml_take_their_labels_from_the_labels_file(tmp_path):
    root = tmp_path / "voc"
    splits = write_demo_dataset(str(root), "voc", 8, seed=9)
    scenes = dict(generate(8, 9))
    gone = splits["train"][:2]
    for image_id in gone:
        os.remove(root / "Annotations" / f"{image_id}.xml")
    cfg = DatasetConfig(uri=str(root))
    problems = [str(p) for p in check_dataset(cfg).problems]
    assert len(problems) == 2 and all("missing annotation XML (or give its labels in --labels-file)" in p
                                      for p in problems)
    names = open_dataset(cfg).classes.names
    (tmp_path / "labels.txt").write_text("".join(
        f"{i} {' '.join(names[c - 1] for c in scenes[i].labels)}\n" for i in gone))
    with_file = cfg.model_copy(update={"labels_file": str(tmp_path / "labels.txt")})
    assert check_dataset(with_file).ok
    ds = open_dataset(with_file)
    for image_id in splits["train"]:
        assert ds.load(image_id).labels == scenes[image_id].labels
    (tmp_path / "bad.txt").write_text(f"{gone[0]} unicorn\n")
    with pytest.raises(Exception, match=r"bad.txt line 1: .*unicorn"):
        open_dataset(cfg.model_copy(update={"labels_file": str(tmp_path / "bad.txt")}))


@pytest.mark.slow
def test_voc_train_aug_trains_on_its_ground_truth_and_is_scored_against_it(tmp_path, ray_local):
    """The ground-truth upper bound on ``train_aug``: without ``masks_dir: SegmentationClassAug`` the
    training is refused before it starts (its ids have no ``SegmentationClass`` mask); with it, the
    head trains, and `wsss predict` of the trained network scores the val masks it writes against
    ``SegmentationClassAug`` exactly."""
    from wsss_platform.predict.config import PredictConfig
    from wsss_platform.predict.job import run_predict
    from wsss_platform.train.config import TrainConfig
    from wsss_platform.train.job import run_train

    from .test_train import TINY_TRAIN

    root = str(tmp_path / "voc")
    splits = write_demo_dataset(root, "voc", 12, seed=8, voc_aug=True)
    args = [f"dataset.uri={root}", "dataset.split=train_aug", "train.pseudo_masks=none", *TINY_TRAIN,
            "model.freeze_backbone=true", "model.head=conv", "compute.num_workers=1", "train.iterations=3",
            "tracking.enabled=false"]
    with pytest.raises(ValueError, match=rf"{len(splits['train_aug'])} of {len(splits['train_aug'])} images of "
                                         r"split train_aug have no mask in .*SegmentationClass \(.*SegmentationClassAug"):
        run_train(build_config(TrainConfig, {}, [*args, f"output={tmp_path / 'refused'}"]))
    assert not os.path.exists(tmp_path / "refused" / "train")

    trained = run_train(build_config(TrainConfig, {}, [*args, f"output={tmp_path / 'seg'}",
                                                       "dataset.masks_dir=SegmentationClassAug"]), log=lambda s: None)
    assert trained.iterations == 3 and trained.val_miou is not None
    out = str(tmp_path / "pred")
    predicted = run_predict(build_config(PredictConfig, {}, [
        f"checkpoint={trained.checkpoint}", f"dataset.uri={root}", "dataset.split=val",
        "dataset.masks_dir=SegmentationClassAug", f"output={out}", "tracking.enabled=false"]))
    cm = ConfusionMatrix(11)
    for image_id in splits["val"]:
        cm.update(_png(storage.join(out, "masks", f"{image_id}.png")),
                  _png(os.path.join(root, "SegmentationClassAug", f"{image_id}.png")))
    assert predicted.done == len(splits["val"]) and predicted.miou == pytest.approx(cm.miou(), abs=1e-9)

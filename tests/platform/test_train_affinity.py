"""PSA on the platform: `wsss train affinity` on a labeling output's CAMs, and `refine: [random_walk]`."""

import json

import pytest
import torch

from wsss_platform.config import ConfigError, build_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label
from wsss_platform.train.config import AffinityConfig
from wsss_platform.train.job import run_train

from .test_label import check_outputs

TINY_AFFINITY = ["model.backbone=open_clip:tiny", "model.pretrained=none", "model.dims=[8, 8, 16]",
                 "train.batch_size=2", "train.crop_size=64", "train.scale_range=[0.5, 0.7]", "train.optimizer=adamw",
                 "train.lr=0.001", "train.radius=3", "train.t=4", "train.eval_images=4",
                 "compute.num_workers=2", "compute.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def affinity_trained(labelled, labelled_cams, tmp_path_factory):
    """4 iterations of AffinityNet with 2 DDP workers on the CAMs of the demo VOC's train split, tracked in sqlite."""
    root = tmp_path_factory.mktemp("affinity")
    cams = labelled_cams
    db = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", db)
        summary = run_train(build_config(AffinityConfig, {}, [
            f"dataset.uri={labelled / 'voc'}", f"output={root / 'affinity'}", f"train.cams={cams}", *TINY_AFFINITY,
            "train.iterations=4", "train.checkpoint_every=2", "train.eval_every=2", "model.input_scale=2"]))
    return root, summary, db


def test_train_affinity_logs_its_three_terms_both_scores_and_an_affinity_preview(affinity_trained, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    _, summary, db = affinity_trained
    assert summary.iterations == 4 and summary.score == "val_rw_miou" and 0 <= summary.val_miou <= 1
    client = MlflowClient(db)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["wsss.recipe"] == "affinity"
    assert run.data.tags["wsss.labels"].startswith("CAMs of ") and run.data.params["train.alpha_high"] == "32.0"
    for key in ("loss", "loss/bg_pos", "loss/fg_pos", "loss/neg"):
        assert [m.step for m in client.get_metric_history(summary.run_id, key)] == [1, 2, 3, 4], key
    for key in ("val_cam_miou", "val_rw_miou"):
        assert {m.step for m in client.get_metric_history(summary.run_id, key)} == {2, 4}
    with open(client.download_artifacts(summary.run_id, "per_class_val_iou.json", str(tmp_path))) as f:
        assert json.load(f)["columns"] == ["class", "val_cam_iou", "val_rw_iou"]
    with Image.open(client.download_artifacts(summary.run_id, "preview.png", str(tmp_path))) as im:
        assert im.size == (5 * 160, 4 * 192)  # image | affinity | CAM mask | random walk | ground truth, 4 images
    state = torch.load(f"{summary.checkpoint}/checkpoint.pt", weights_only=True)
    assert state["iteration"] == 4 and state["affinitynet"]["dims"] == [8, 8, 16]
    assert state["affinitynet"]["input_scale"] == 2  # the walk reads the images as the network was trained
    from wsss_platform.checkpoint import load_network

    with pytest.raises(ValueError, match=r"is a affinitynet checkpoint, not a segmenter.s: .*random_walk.checkpoint"):
        load_network(summary.checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("refine", [["random_walk"], ["caa", "random_walk"]])
def test_label_with_the_random_walk_alone_or_after_caa(refine, affinity_trained, labelled, tmp_path, ray_local):
    root, _, _ = affinity_trained
    cfg = build_config(LabelConfig, {}, [
        f"dataset.uri={labelled / 'voc'}", f"output={tmp_path / 'out'}", "model.name=tiny", "model.pretrained=none",
        f"refine={refine}", f"random_walk.checkpoint={root / 'affinity'}", "random_walk.radius=3",
        "random_walk.t=8", "tracking.enabled=false", "cache=full"])
    summary = run_label(cfg)
    check_outputs(cfg, summary)  # the scores re-derived from the cached CAMs through the same refiners
    assert json.loads((tmp_path / "out" / "run.json").read_text())["settings"]["refine"] == refine


def test_a_random_walk_checkpoint_of_another_class_order_is_refused(affinity_trained, labelled, tmp_path):
    from .test_train_faults import swapped_classes

    root, _, _ = affinity_trained
    voc = swapped_classes(labelled / "voc", tmp_path / "voc")
    with pytest.raises(ConfigError, match=r"random_walk.checkpoint: .* was trained on classes \['circle', 'square', .*\], "
                                          r"the dataset has \['square', 'circle', .*\]"):
        run_label(build_config(LabelConfig, {}, [
            f"dataset.uri={voc}", f"output={tmp_path / 'out'}", "model.name=tiny", "model.pretrained=none",
            "refine=[random_walk]", f"random_walk.checkpoint={root / 'affinity'}", "tracking.enabled=false"]))
    assert not (tmp_path / "out").exists()


def test_psa_inputs_missing_or_wrong_fail_before_any_work(labelled, labelled_cams, tmp_path):
    base = [f"dataset.uri={labelled / 'voc'}", f"output={tmp_path / 'out'}", "model.name=tiny", "model.pretrained=none",
            "refine=[random_walk]", "tracking.enabled=false"]
    with pytest.raises(ConfigError, match=r"random_walk runs a trained network: give random_walk.checkpoint=URI"):
        run_label(build_config(LabelConfig, {}, base))
    with pytest.raises(ConfigError, match=r"random_walk.checkpoint: no checkpoint.pt in .*nowhere"):
        run_label(build_config(LabelConfig, {}, [*base, f"random_walk.checkpoint={tmp_path / 'nowhere'}"]))
    seg = tmp_path / "seg-checkpoint"
    seg.mkdir()
    torch.save({"model": {}, "segmenter": {"class_names": ["background"]}}, seg / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"not an AffinityNet checkpoint"):
        run_label(build_config(LabelConfig, {}, [*base, f"random_walk.checkpoint={seg}"]))
    train = [f"dataset.uri={labelled / 'voc'}", f"output={tmp_path / 'aff'}", *TINY_AFFINITY]
    with pytest.raises(ValueError, match=r"train.cams: give a `wsss label` output of this split \(--cams URI\)"):
        run_train(build_config(AffinityConfig, {}, train))
    with pytest.raises(ValueError, match=r"cams/.*\.npz not found \(train.val_split val: \d+ of \d+ images\).*set val_split"):
        run_train(build_config(AffinityConfig, {}, [*train, f"train.cams={labelled_cams}", "train.val_split=val"]))
    with pytest.raises(ConfigError, match=r"alpha_low \(32.0\) must be below alpha_high \(4.0\)"):
        build_config(AffinityConfig, {}, [*train, "train.alpha_low=32", "train.alpha_high=4"])


@pytest.mark.slow
def test_a_sweep_over_beta_and_t_runs_affinitynet_once(affinity_trained, labelled, tmp_path, ray_local, monkeypatch):
    """6 trials over random_walk.beta × random_walk.t: the first computes the CAMs and each image's
    affinity; every later trial reads both and runs no network. MLflow: one parent, 6 children."""
    import csv

    import yaml
    from mlflow.tracking import MlflowClient

    from wsss_platform.sweep.config import load_sweep_config
    from wsss_platform.sweep.job import run_sweep

    root, _, _ = affinity_trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    doc = {"label": {"dataset": {"uri": str(labelled / "voc")}, "output": str(tmp_path / "labels"),
                     "model": {"name": "tiny", "pretrained": "none"}, "refine": ["random_walk"],
                     "random_walk": {"checkpoint": str(root / "affinity"), "radius": 3}},
           "objective": "miou", "subset": {"num_images": 4},
           "search_space": {"random_walk.beta": {"choices": [2, 8]}, "random_walk.t": {"choices": [1, 5, 32]}},
           "tune": {"num_trials": 6, "max_concurrent_trials": 1, "seed": 1},
           "output": str(tmp_path / "sweep"), "tracking": {"experiment": "psa-sweep"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    cfg, dims = load_sweep_config(tmp_path / "sweep.yaml")
    summary = run_sweep(cfg, dims)
    assert summary.num_trials == 6 and summary.errored == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    assert len({(r["param:random_walk.beta"], r["param:random_walk.t"]) for r in rows}) == 6
    ran = sorted(int(r["refiner_images_run"]) for r in rows)
    assert ran == [0, 0, 0, 0, 0, 4]  # AffinityNet on the 4 images once, in the first trial
    assert sorted(int(r["cams_cached"]) for r in rows) == [0, 1, 1, 1, 1, 1]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "sweep" / "cache").glob("*-*.pt")) == ["cams", "features",
                                                                                                  "refiner"]
    assert len({r["miou"] for r in rows}) > 1  # β and t change the masks
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("psa-sweep")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    assert len(children) == 6

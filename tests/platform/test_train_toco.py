"""ToCo on Ray Train (`wsss train toco`) and its network as a CAM source of `wsss label`."""

import json

import pytest
import torch

from wsss_platform.config import ConfigError, build_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label
from wsss_platform.train.config import ToCoConfig
from wsss_platform.train.job import run_train

from .test_label import check_outputs

TINY_TOCO = ["model.backbone=open_clip:tiny", "model.pretrained=none", "model.proj_dim=32", "train.batch_size=2",
             "train.crop_size=64", "train.local_crop_size=32", "train.local_crops=2", "train.cam_scales=[1.0]",
             "train.eval_scales=[1.0, 0.5]", "train.warmup_iterations=0", "train.lr=0.0005",
             "compute.num_workers=2", "compute.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def toco_trained(labelled, tmp_path_factory):
    """4 iterations of ToCo with 2 DDP workers on the demo VOC's image-level labels, tracked in sqlite."""
    root = tmp_path_factory.mktemp("toco")
    db = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", db)
        summary = run_train(build_config(ToCoConfig, {}, [
            f"dataset.uri={labelled / 'voc'}", f"output={root / 'toco'}", *TINY_TOCO, "train.iterations=4",
            "train.checkpoint_every=2", "train.eval_every=2", "train.seg_from=2"]))
    return root, summary, db


def test_train_toco_logs_every_loss_term_both_val_scores_and_a_cam_preview(toco_trained, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    _, summary, db = toco_trained
    assert summary.iterations == 4 and summary.score == "val_cam_miou" and 0 <= summary.val_miou <= 1
    client = MlflowClient(db)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["wsss.recipe"] == "toco"
    assert run.data.tags["wsss.labels"] == "image-level labels" and run.data.params["train.w_ptc"] == "0.2"
    steps = {k: [m.step for m in client.get_metric_history(summary.run_id, k)]
             for k in ("loss", "loss/cls", "loss/aux", "loss/ptc", "loss/ctc", "loss/seg", "loss/reg")}
    assert steps["loss"] == steps["loss/cls"] == steps["loss/ptc"] == steps["loss/ctc"] == [1, 2, 3, 4]
    assert steps["loss/seg"] == steps["loss/reg"] == [3, 4]  # the head learns from iteration seg_from = 2 (step 3)
    for key in ("val_cam_miou", "val_seg_miou"):
        assert {m.step for m in client.get_metric_history(summary.run_id, key)} == {2, 4}
    with open(client.download_artifacts(summary.run_id, "per_class_val_iou.json", str(tmp_path))) as f:
        table = json.load(f)
    assert table["columns"] == ["class", "val_cam_iou", "val_seg_iou"]
    with Image.open(client.download_artifacts(summary.run_id, "preview.png", str(tmp_path))) as im:
        assert im.size == (5 * 160, 4 * 192)  # image | CAM | CAM mask | seg head | ground truth, 4 images
    # the checkpoint rebuilds the network without a config, and the logged model is that network
    state = torch.load(f"{summary.checkpoint}/checkpoint.pt", weights_only=True)
    assert state["iteration"] == 4 and state["toco"]["class_names"][0] == "background"
    import mlflow

    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{summary.run_id}'")
    net = mlflow.pytorch.load_model(models[0].model_uri)
    assert net(torch.randn(1, 3, 48, 64))["logits"].shape == (1, len(state["toco"]["class_names"]) - 1)
    # wsss predict takes segmenters: a ToCo checkpoint is named for what it is, with what to do instead
    from wsss_platform.checkpoint import load_network

    with pytest.raises(ValueError, match=r"is a toco checkpoint, not a segmenter.s: .* cam_source=toco model.checkpoint"):
        load_network(summary.checkpoint)


@pytest.mark.parametrize("refine", [["caa"], pytest.param(["par"], marks=pytest.mark.slow),
                                    pytest.param(["crf"], marks=pytest.mark.slow), pytest.param([], marks=pytest.mark.slow)])
def test_label_with_toco_cams_and_any_refiner(refine, toco_trained, labelled, tmp_path, ray_local):
    if "crf" in refine:
        pytest.importorskip("pydensecrf.densecrf")
    root, _, _ = toco_trained
    cfg = build_config(LabelConfig, {}, [
        f"dataset.uri={labelled / 'voc'}", f"output={tmp_path / 'out'}", "cam_source=toco",
        f"model.checkpoint={root / 'toco'}", f"refine={refine}", "tracking.enabled=false",
        "cache=full", "compute.batch_size=4"])
    summary = run_label(cfg)
    check_outputs(cfg, summary)  # masks, confidence, caches; scores re-derived from the cached CAMs
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["settings"]["cam_source"] == "toco" and run_json["settings"]["refine"] == refine


@pytest.mark.slow
def test_label_with_the_toco_heads_masks(toco_trained, labelled, tmp_path, ray_local):
    root, _, _ = toco_trained
    cfg = build_config(LabelConfig, {}, [
        f"dataset.uri={labelled / 'voc'}", f"output={tmp_path / 'out'}", "cam_source=toco_seg",
        f"model.checkpoint={root / 'toco'}", "refine=[]", "tracking.enabled=false", "cache=cams"])
    check_outputs(cfg, run_label(cfg))


def test_toco_labeling_fails_at_validation_with_what_to_do(toco_trained, labelled, tmp_path):
    _, summary, _ = toco_trained
    base = [f"dataset.uri={labelled / 'voc'}", f"output={tmp_path / 'out'}", "cam_source=toco", "tracking.enabled=false"]
    with pytest.raises(ConfigError, match=r"cam_source=toco labels with a trained network: give model.checkpoint=URI"):
        run_label(build_config(LabelConfig, {}, base))
    with pytest.raises(ConfigError, match=r"model.checkpoint: no checkpoint.pt in .*nowhere"):
        run_label(build_config(LabelConfig, {}, [*base, f"model.checkpoint={tmp_path / 'nowhere'}"]))
    # a segmenter's checkpoint is not a ToCo network
    seg = tmp_path / "seg-checkpoint"
    seg.mkdir()
    torch.save({"model": {}, "segmenter": {"class_names": ["background"]}}, seg / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"cam_source=toco with model.checkpoint=.*: not a ToCo checkpoint"):
        run_label(build_config(LabelConfig, {}, [*base, f"model.checkpoint={seg}"]))
    # a CAM refiner after a probability refiner: refused from the names, before anything runs
    with pytest.raises(ConfigError, match=r"refiner 'caa' works on CAMs and must come before 'par'"):
        build_config(LabelConfig, {}, [*base, f"model.checkpoint={summary.checkpoint}", "refine=[par, caa]"])


def test_other_classes_than_the_checkpoints_fail_before_any_work(toco_trained, tmp_path):
    from wsss_platform.datasets.demo import write_demo_dataset

    _, summary, _ = toco_trained
    write_demo_dataset(str(tmp_path / "voc"), "voc", 4, seed=2)
    names = (tmp_path / "voc" / "classes.txt").read_text().split()
    (tmp_path / "voc" / "classes.txt").write_text("".join(f"{n}\n" for n in reversed(names)))  # same names, other order
    with pytest.raises(ConfigError, match=r"trained on classes \['circle', .* the dataset has \['arrow', "):
        run_label(build_config(LabelConfig, {}, [f"dataset.uri={tmp_path / 'voc'}",
                                                 f"output={tmp_path / 'out'}", "cam_source=toco",
                                                 f"model.checkpoint={summary.checkpoint}", "tracking.enabled=false"]))


@pytest.mark.slow
def test_sweep_over_refinement_of_toco_cams_reuses_one_cam_cache(toco_trained, labelled, tmp_path, ray_local,
                                                                  monkeypatch):
    """A labeling sweep with cam_source=toco: CAA and mask settings swept over one cached set of CAMs."""
    import csv

    import yaml

    from wsss_platform.config import load_config
    from wsss_platform.sweep.config import load_sweep_config
    from wsss_platform.sweep.job import run_sweep

    root, _, _ = toco_trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    doc = {"label": {"dataset": {"uri": str(labelled / "voc")}, "output": str(tmp_path / "labels"),
                     "cam_source": "toco", "model": {"checkpoint": str(root / "toco")}, "refine": ["caa"]},
           "objective": "miou", "subset": {"num_images": 4},
           "search_space": {"caa.t": {"choices": [1, 2]}, "mask.bg_value": {"choices": [0.4, 0.6]}},
           "tune": {"num_trials": 4, "max_concurrent_trials": 1, "seed": 1},
           "output": str(tmp_path / "sweep"), "tracking": {"experiment": "toco-sweep"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    cfg, dims = load_sweep_config(tmp_path / "sweep.yaml")
    summary = run_sweep(cfg, dims)
    assert summary.num_trials == 4 and summary.complete + summary.stopped == 4 and summary.errored == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    assert {(r["param:caa.t"], r["param:mask.bg_value"]) for r in rows} == {("1", "0.4"), ("1", "0.6"), ("2", "0.4"),
                                                                            ("2", "0.6")}
    assert [p.name.split("-")[0] for p in (tmp_path / "sweep" / "cache").glob("*-*.pt")] == ["cams"]
    best = load_config(LabelConfig, tmp_path / "sweep" / "best.yaml")
    assert best.cam_source == "toco" and best.model.checkpoint == str(root / "toco")

"""Sweeps on generated data: cached trials equal the labeling path, and a real Tune + MLflow run."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from wsss_core.metrics import ConfusionMatrix
from wsss_platform.cli import main
from wsss_platform.config import build_config, load_config
from wsss_platform.datasets import open_dataset
from wsss_platform.datasets.demo import write_demo_dataset
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.stages import build_pipeline, class_set, device_for
from wsss_platform.sweep import cache
from wsss_platform.sweep.config import (
    SweepConfig,
    apply_params,
    load_sweep_config,
    parse_search_space,
)
from wsss_platform.sweep.job import run_sweep
from wsss_platform.sweep.objective import features_task, write_subset
from wsss_platform.sweep.trial import TrialContext, evaluate

BIN = Path(sys.executable).parent
TINY_LABEL = {"model": {"name": "tiny", "pretrained": "none"}, "refine": ["caa"],
              "compute": {"batch_size": 4, "loader_batch_size": 4}}


def direct_miou(label: LabelConfig, subset: cache.Subset) -> tuple[float, float]:
    """The labeling path (ClipES end to end on the images) scored on the subset."""
    ds_names = subset.class_names
    es = build_pipeline(label, class_set(ds_names, label), device_for(0))
    results = es([im.numpy() for im in subset.images], subset.labels)
    cm_raw, cm = ConfusionMatrix(len(ds_names) + 1), ConfusionMatrix(len(ds_names) + 1)
    for r, gt in zip(results, subset.masks, strict=True):
        cm_raw.update(r.mask_raw, gt)
        cm.update(r.mask, gt)
    return cm_raw.miou(), cm.miou()


def test_cached_trials_equal_the_labeling_path(tmp_path):
    """Trials built on the cached features and CAMs score exactly what `wsss label` would produce."""
    write_demo_dataset(str(tmp_path / "voc"), "voc", 10, seed=5)
    out = str(tmp_path / "sweep")
    label = TINY_LABEL | {"dataset": {"uri": str(tmp_path / "voc")}}
    space = {"caa.attn_layers": {"low": 2, "high": 4}, "text.template": {"choices": ["a photo of a {}.", "a {}."]},
             "mask.bg_rule": {"choices": ["threshold", "power"]},
             "mask.bg_value": {"threshold": {"low": 0.3, "high": 0.7}, "power": {"low": 0.5, "high": 3}}}
    cfg = build_config(SweepConfig, {"label": label, "search_space": space, "output": out, "subset": {"num_images": 6}})
    dims = parse_search_space(cfg.search_space, cfg.label)
    subset = write_subset(cfg, out, print)
    assert len(subset.ids) == 6 and all(m is not None for m in subset.masks)
    payload = cfg.label.model_dump(mode="json")
    aux = cache.aux_needed(cfg.label, dims)
    assert aux == ["attn/2", "attn/3", "attn/4"]
    features_task(payload, out, payload["dataset"]["storage"], aux, 0.0)
    features = cache.load(cache.features_uri(out, cfg.label), cfg.label.dataset.storage)
    assert len(features) == 6 and sorted(k for k in features[0] if "/" in k) == aux

    ctx = TrialContext(out, payload, payload["dataset"]["storage"], "miou", report_chunks=3, gpus=0.0, aux=tuple(aux))
    trials = [
        {"caa.attn_layers": 2, "text.template": "a photo of a {}.", "mask.bg_rule": "power", "mask.bg_value:power": 1.5},
        {"caa.attn_layers": 4, "text.template": "a photo of a {}.", "mask.bg_rule": "threshold",
         "mask.bg_value:threshold": 0.4},
        {"caa.attn_layers": 3, "text.template": "a {}.", "mask.bg_rule": "threshold", "mask.bg_value:threshold": 0.6},
    ]
    for n, params in enumerate(trials):
        reports: list[dict] = []
        final = evaluate(params, ctx, reports.append)
        assert [r["images"] for r in reports] == [2, 4, 6] and [r["complete"] for r in reports] == [0, 0, 1]
        assert final["cams_cached"] == int(n == 1)  # the second trial reuses the first one's prompt setting
        label_cfg = build_config(LabelConfig, apply_params(payload, params))
        raw, refined = direct_miou(label_cfg, subset)
        # equal up to float16: `wsss label` refines its CAMs and attention rounded as its cache keeps them,
        # the sweep's cache holds float32 CAMs and float16 attention
        assert final["miou_raw"] == pytest.approx(raw, abs=1e-4)
        assert final["miou"] == pytest.approx(refined, abs=2e-3)
        assert final["objective"] == final["miou"] and 0 <= final["ignore_fraction"] <= 1
        assert math.isfinite(final["sharpness"]) and final["iou/background"] >= 0
    assert len(list((tmp_path / "sweep" / "cache").glob("cams-*.pt"))) == 2  # one per distinct prompt setting

    # sharpness: a label-free objective of the prompt setting alone, reported once
    sharp_ctx = TrialContext(out, payload, payload["dataset"]["storage"], "sharpness", report_chunks=3, gpus=0.0,
                             aux=tuple(aux))
    reports = []
    final = evaluate(trials[2], sharp_ctx, reports.append)
    assert len(reports) == 1 and final["objective"] == final["sharpness"] and final["complete"] == 1
    from wsss_core.prompts import sharpness

    cams = cache.load(cache.cams_uri(out, build_config(LabelConfig, apply_params(payload, trials[2]))),
                      cfg.label.dataset.storage)
    assert final["sharpness"] == pytest.approx(sharpness([c["scores"] for c in cams if c["scores"].numel()]))


def sweep_file(tmp_path: Path, data: Path, **extra) -> Path:
    label = TINY_LABEL | {"dataset": {"uri": str(data)}, "output": str(tmp_path / "labels"),
                          "tracking": {"preview_images": 1}}
    doc = {"label": label, "objective": "miou", "subset": {"num_images": 8},
           "search_space": {"text.template": {"choices": ["a photo of a {}.", "a clean origami {}."]},
                            "caa.box_threshold": {"low": 0.2, "high": 0.8},
                            "caa.t": {"low": 1, "high": 3},
                            "mask.mu": {"low": 0.5, "high": 0.99}},
           "tune": {"num_trials": 6, "max_concurrent_trials": 2, "report_chunks": 2, "seed": 3, "startup_trials": 3},
           "output": str(tmp_path / "sweep"), "tracking": {"experiment": "sweep-e2e"}}
    for k, v in extra.items():
        doc[k] = doc.get(k, {}) | v if isinstance(v, dict) else v
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_sweep_end_to_end_with_mlflow_server(tmp_path, ray_local, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    write_demo_dataset(str(tmp_path / "voc"), "voc", 12, seed=8)
    cfg, dims = load_sweep_config(sweep_file(tmp_path, tmp_path / "voc"))
    summary = run_sweep(cfg, dims)
    assert summary.complete + summary.stopped == 6 and summary.errored == 0 and not summary.interrupted
    assert summary.complete >= 1 and summary.best_yaml

    out = tmp_path / "sweep"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 6 and len({r["trial"] for r in rows}) == 6
    complete = [r for r in rows if r["status"] == "complete"]
    assert max(float(r["miou"]) for r in complete) == pytest.approx(summary.best_value)
    assert len(list((out / "cache").glob("cams-*.pt"))) <= 2  # one per template at most

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("sweep-e2e")
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["objective"] == "miou" and parent.data.params["tune.num_trials"] == "6"
    assert parent.data.metrics["best_objective"] == pytest.approx(summary.best_value)
    assert {f"best.{k}" for k in summary.best_params} <= set(parent.data.params)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best.yaml", "trials.csv", "trials.json", "sweep.json", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots and "plots/parallel_coordinate.png" in plots
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6 and {c.info.status for c in children} == {"FINISHED"}
    for c in children:
        assert set(c.data.params) == {d.name for d in dims}
        assert {"objective", "miou", "miou_raw", "sharpness", "iou/background"} <= set(c.data.metrics)
        assert 0 <= c.data.metrics["miou"] <= 1
    best_child = max((c for c in children if c.data.metrics["complete"] == 1), key=lambda c: c.data.metrics["miou"])
    assert best_child.data.metrics["miou"] == pytest.approx(summary.best_value)
    for k, v in summary.best_params.items():
        assert parent.data.params[f"best.{k}"] == str(v)

    # Rerunning the finished sweep is a no-op: same best trial, best.yaml byte-identical, parent FINISHED.
    best_yaml = (out / "best.yaml").read_bytes()
    again = run_sweep(cfg, dims)
    assert not again.resumed and again.best_trial == summary.best_trial and again.best_value == summary.best_value
    assert (out / "best.yaml").read_bytes() == best_yaml
    assert client.get_run(summary.parent_run_id).info.status == "FINISHED"
    assert len(client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 6

    # The best config runs unchanged with `wsss label`.
    best = load_config(LabelConfig, out / "best.yaml")
    assert best.caa.t == summary.best_params["caa.t"] and best.text.template == summary.best_params["text.template"]
    assert main(["label", "--config", str(out / "best.yaml")]) == 0
    ds = open_dataset(best.dataset)
    assert sorted(p.stem for p in (tmp_path / "labels" / "masks").glob("*.png")) == sorted(ds.ids)


def finished_trials(out: Path) -> dict[str, str]:
    """trial folder -> its result.json, for trials that reported their last chunk."""
    done = {}
    for f in (out / "tune" / "sweep").glob("trial_*/result.json"):
        text = f.read_text()
        if '"complete": 1' in text:
            done[f.parent.name] = text
    return done


def terminated_trials(out: Path) -> dict[str, str]:
    """trial folder -> its result.json, for the trials Tune's saved state holds as TERMINATED (what a
    resume skips; a trial whose last report raced the Ctrl-C is run again, as Tune does)."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(out / "tune" / "sweep")).trials
    return {Path(t.path).name: (Path(t.path) / "result.json").read_text() for t in trials if t.status == "TERMINATED"}


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    pytest.importorskip("pydensecrf.densecrf")  # the CRF paces the trials (installed by `make`)
    write_demo_dataset(str(tmp_path / "voc"), "voc", 40, seed=9)
    # The CRF makes each trial take a second or so: time to interrupt between trials.
    path = sweep_file(tmp_path, tmp_path / "voc", subset={"num_images": 32},
                      tune={"max_concurrent_trials": 1, "early_stopping": False},
                      label=TINY_LABEL | {"dataset": {"uri": str(tmp_path / "voc")}, "refine": ["caa", "crf"]})
    out = tmp_path / "sweep"
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [str(BIN / "wsss"), "sweep", "--config", str(path)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        # one at a time: a third trial's last report means two trials Tune holds as TERMINATED
        while len(finished_trials(out)) < 3:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no three trials finished in 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
        assert proc.wait(120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    before = terminated_trials(out)
    assert 2 <= len(before) < 6, "the sweep was not interrupted mid-way"
    assert "run the same command again to resume" in (tmp_path / "first.log").read_text()

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the interrupted sweep" in second.stdout
    after = finished_trials(out)
    assert len(after) == 6
    for name, text in before.items():  # finished trials were not run again
        assert after[name] == text
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"complete"}
    state = json.loads((out / "sweep.json").read_text())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 6 and len({c.data.tags["trial_name"] for c in finished}) == 6
    assert not [c for c in children if c.info.status == "RUNNING"]
    assert np.isfinite(parent.data.metrics["best_objective"])


@pytest.mark.slow  # the default set reaches S3 through the labeling and training tests
def test_sweep_on_s3(s3_bucket, ray_local, tmp_path, monkeypatch):
    """Dataset, caches, Tune's experiment state and best.yaml all on object storage."""
    from wsss_platform import storage

    monkeypatch.chdir(tmp_path)
    write_demo_dataset(f"{s3_bucket}/voc", "voc", 8, seed=10)
    path = sweep_file(tmp_path, Path("unused"), output=f"{s3_bucket}/sweep", tracking={"enabled": False},
                      tune={"num_trials": 3, "max_concurrent_trials": 1})
    cfg, dims = load_sweep_config(path, [f"label.dataset.uri={s3_bucket}/voc"])
    summary = run_sweep(cfg, dims)
    assert summary.complete + summary.stopped == 3 and summary.errored == 0
    names = storage.list_names(f"{s3_bucket}/sweep")
    assert {"best.yaml", "trials.csv", "sweep.json", "cache", "tune"} <= set(names)
    assert any(n.startswith("features-") for n in storage.list_names(f"{s3_bucket}/sweep/cache"))
    best = load_config(LabelConfig, f"{s3_bucket}/sweep/best.yaml")  # `wsss label --config s3://…` reads it
    assert best.dataset.uri == f"{s3_bucket}/voc"
    # the same command again finds the finished sweep on S3 and runs nothing: a no-op that reports it
    best_yaml = storage.read_bytes(f"{s3_bucket}/sweep/best.yaml")
    again = run_sweep(cfg, dims)
    assert not again.resumed and again.complete + again.stopped == 3 and again.best_value == summary.best_value
    assert again.best_trial == summary.best_trial and storage.read_bytes(f"{s3_bucket}/sweep/best.yaml") == best_yaml
    # a different budget into the same output is refused, naming what changed
    from wsss_platform.config import ConfigError

    bigger = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"num_trials": 4})})
    with pytest.raises(ConfigError, match=r"holds a sweep made with other settings \(changed: tune\.num_trials \(3 -> 4\)\)"):
        run_sweep(bigger, dims)


@pytest.mark.slow
def test_sweep_over_cam_sources_and_refiner_lists(tmp_path, ray_local, monkeypatch):
    """cam_source and refine are dimensions: clip_es and gradcam, with CAA and with CAA + CRF, each
    setting once; the two CLIP sources share one feature cache and have a CAM cache each."""
    pytest.importorskip("pydensecrf.densecrf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_demo_dataset(str(tmp_path / "voc"), "voc", 10, seed=21)
    path = sweep_file(tmp_path, tmp_path / "voc", subset={"num_images": 4}, tune={"max_concurrent_trials": 1})
    doc = yaml.safe_load(path.read_text())
    doc["search_space"] = {"cam_source": {"choices": ["clip_es", "gradcam"]}, "refine": {"choices": [["caa"], ["caa", "crf"]]}}
    path.write_text(yaml.safe_dump(doc))
    cfg, dims = load_sweep_config(path)
    summary = run_sweep(cfg, dims)
    assert summary.num_trials == 4 and summary.complete + summary.stopped == 4 and summary.errored == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    assert {(r["param:cam_source"], r["param:refine"]) for r in rows} == {
        ("clip_es", "caa"), ("clip_es", "caa+crf"), ("gradcam", "caa"), ("gradcam", "caa+crf")}
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "sweep" / "cache").glob("*-*.pt"))
    assert cached == ["cams", "cams", "features"]
    best = load_config(LabelConfig, tmp_path / "sweep" / "best.yaml")
    assert best.cam_source == summary.best_params["cam_source"] and isinstance(best.refine, list)

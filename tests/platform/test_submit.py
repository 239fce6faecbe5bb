"""`wsss submit label` and `wsss jobs` against a real Ray head started with `ray start` on loopback."""

import re
import time

import pyarrow.parquet as pq
import pytest

from wsss_platform.cli import main
from wsss_platform.datasets.demo import write_demo_dataset

from .test_label import TINY
from .test_sweep import sweep_file


def job_id_from(out: str) -> str:
    return re.search(r"submitted (?:label|sweep|train|predict) job (\S+)", out).group(1)


def test_submit_follow_status_logs_and_stop(tmp_path, ray_head, capsys):
    write_demo_dataset(str(tmp_path / "voc"), "voc", 6, seed=31)
    out = tmp_path / "out"
    rc = main(["submit", "label", "--address", ray_head, "--dataset", str(tmp_path / "voc"), "--output", str(out),
               *TINY, "tracking.enabled=false", "--follow"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    job_id = job_id_from(printed)
    assert "labelled 5/5 images" in printed
    assert len(pq.read_table(out / "manifest.parquet")) == 5

    assert main(["jobs", "status", job_id, "--address", ray_head]) == 0
    assert f"{job_id}: SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--address", ray_head]) == 0
    assert "[wsss label] labelled 5/5" in capsys.readouterr().out

    # A long job, stopped while it runs.
    write_demo_dataset(str(tmp_path / "big"), "voc", 200, seed=32)
    assert main(["submit", "label", "--address", ray_head, "--dataset", str(tmp_path / "big"), "--output",
                 str(tmp_path / "big-out"), *TINY, "compute.batch_size=1", "tracking.enabled=false"]) == 0
    long_id = job_id_from(capsys.readouterr().out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        main(["jobs", "status", long_id, "--address", ray_head])
        if "RUNNING" in capsys.readouterr().out:
            break
        time.sleep(1)
    assert main(["jobs", "stop", long_id, "--address", ray_head]) == 0
    assert "stop requested" in capsys.readouterr().out
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline and "STOPPED" not in status:
        main(["jobs", "status", long_id, "--address", ray_head])
        status = capsys.readouterr().out
        time.sleep(1)
    assert f"{long_id}: STOPPED" in status


def test_submit_needs_an_address(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["jobs", "status", "x"]) == 2
    assert "no cluster address" in capsys.readouterr().err


def test_submit_sweep(tmp_path, ray_head, capsys):
    write_demo_dataset(str(tmp_path / "voc"), "voc", 8, seed=33)
    path = sweep_file(tmp_path, tmp_path / "voc")
    rc = main(["submit", "sweep", "--address", ray_head, "--config", str(path), "--num-trials", "3",
               "tracking.enabled=false", "tune.max_concurrent_trials=1", "--follow"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    assert re.search(r"\[wsss sweep\] \d trials complete, \d stopped early, 0 failed \(budget 3\)", printed)
    assert (tmp_path / "sweep" / "best.yaml").is_file()
    assert main(["jobs", "status", job_id_from(printed), "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out


@pytest.mark.slow
def test_submit_train_then_predict(tmp_path, ray_head, capsys):
    """`wsss submit train` and `wsss submit predict` run on the cluster and write what the local ones do."""
    from .test_train import TINY_TRAIN

    write_demo_dataset(str(tmp_path / "voc"), "voc", 8, seed=34)
    seg = tmp_path / "seg"
    rc = main(["submit", "train", "--address", ray_head, "--dataset", str(tmp_path / "voc"), "--pseudo-masks", "none",
               "--output", str(seg), *TINY_TRAIN, "compute.num_workers=1", "train.iterations=2",
               "train.checkpoint_every=2", "tracking.enabled=false", "--follow"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    assert "[wsss train] trained 2 iterations" in printed
    rc = main(["submit", "predict", "--address", ray_head, "--checkpoint", str(seg), "--dataset", str(tmp_path / "voc"),
               "--split", "val", "--output", str(tmp_path / "pred"), "tracking.enabled=false", "--follow"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    assert re.search(r"\[wsss predict\] predicted 2/2 images \(0 failed\)", printed)
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == 2


def training_sweep_file(tmp_path, labelled, frozen: bool = False):
    """4 trials over train.mu, each a 4-iteration Train run scored twice on val (ASHA in between);
    ``frozen``: the head on the frozen backbone's features."""
    import yaml

    from .test_train import TINY_TRAIN

    train: dict = {"dataset": {"uri": str(labelled / "voc")}, "output": str(tmp_path / "unused"),
                   "train": {"pseudo_masks": str(labelled / "labels"), "iterations": 4}}
    for key, value in (o.split("=", 1) for o in TINY_TRAIN):
        section, name = key.split(".")
        train.setdefault(section, {})[name] = yaml.safe_load(value)
    train["compute"] |= {"num_workers": 1, "cpus_per_worker": 0.4, "loader_cpus": 0.4}
    if frozen:
        train["model"] |= {"head": "conv", "freeze_backbone": True}
    doc = {"train": train, "search_space": {"train.mu": {"choices": [0.0, 0.5, 0.9, 0.95]}},
           "tune": {"num_trials": 4, "max_concurrent_trials": 2, "report_chunks": 2, "seed": 1},
           "output": str(tmp_path / "sweep"), "tracking": {"experiment": "train-sweep-frozen" if frozen else "train-sweep"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "sweep.yaml"


def test_training_sweep_needs_the_state_api(tmp_path, labelled, ray_local):
    """The session's Ray has no dashboard: a training sweep says so before any trial starts."""
    from wsss_platform.config import ConfigError
    from wsss_platform.sweep.config import load_sweep_config
    from wsss_platform.sweep.job import run_sweep

    cfg, dims = load_sweep_config(training_sweep_file(tmp_path, labelled), ["tracking.enabled=false"])
    with pytest.raises(ConfigError, match=r"needs Ray's State API .* --include-dashboard true"):
        run_sweep(cfg, dims)
    assert not (tmp_path / "sweep" / "trials").exists()


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["fine-tuned", "frozen"])
def test_submit_training_sweep_tune_asha_mlflow_parent_and_children(frozen, tmp_path, labelled, ray_head, mlflow_server,
                                                                    monkeypatch, capsys):
    """`wsss submit sweep` with a training config: 4 trials, each a Ray Train run scored by val mIoU, on a
    2-CPU cluster (trials that ASHA stops must give their workers back); a parent MLflow run with one
    child per trial; best.yaml is a training config `wsss train` accepts. Frozen: the backbone's
    features computed once, before the trials, into the sweep's cache, and no trial computes its own."""
    import yaml
    from mlflow.tracking import MlflowClient

    from wsss_platform.config import build_config
    from wsss_platform.train.config import TrainConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    rc = main(["submit", "sweep", "--address", ray_head, "--config",
               str(training_sweep_file(tmp_path, labelled, frozen)), "--follow"])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    found = re.search(r"\[wsss sweep\] (\d) trials complete, (\d) stopped early, 0 failed \(budget 4\)", printed)
    assert found and int(found[1]) + int(found[2]) == 4, printed[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())
    assert build_config(TrainConfig, best).train.mu in (0.0, 0.5, 0.9, 0.95)
    trials = list((tmp_path / "sweep" / "trials").iterdir())
    assert len(trials) == 4 and all(any(t.glob("train/checkpoint_*")) for t in trials)
    if frozen:
        assert "[wsss train] features: 16 computed, 0 reused" in printed, printed[-3000:]
        assert len(list((tmp_path / "sweep" / "cache" / "features").glob("*/*.npz"))) == 16
        assert not any((t / "features").exists() for t in trials)
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("train-sweep-frozen" if frozen else "train-sweep")
    parent = client.search_runs([exp.experiment_id], "tags.`wsss.job` = 'sweep'")[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["wsss.model"].startswith("open_clip:tiny")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert {float(c.data.params["train.mu"]) for c in children} == {0.0, 0.5, 0.9, 0.95}
    assert all("val_miou" in c.data.metrics and "objective" in c.data.metrics for c in children)
    assert float(parent.data.params["best.train.mu"]) == best["train"]["mu"]

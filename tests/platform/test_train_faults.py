"""Training as trustworthy as labeling: inputs checked before the first step, permanent errors named once
and not retried, a failed start that blocks nothing, a finished training left alone, Ctrl-C at any
moment, a quiet terminal."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsss_platform.config import ConfigError, build_config
from wsss_platform.datasets.base import DatasetError
from wsss_platform.train.config import AffinityConfig, ToCoConfig, TrainConfig
from wsss_platform.train.job import run_train

from .test_train import TINY_TRAIN, _ray_log_lines


def swapped_classes(voc: Path, to: Path) -> Path:
    """A copy of the demo VOC whose classes.txt lists its first two classes the other way round."""
    shutil.copytree(voc, to)
    names = (to / "classes.txt").read_text().split("\n")
    names[0], names[1] = names[1], names[0]
    (to / "classes.txt").write_text("\n".join(names))
    return to


def test_inputs_labelled_for_another_class_order_are_refused_before_anything_is_written(labelled, labelled_cams,
                                                                                        tmp_path):
    voc = swapped_classes(labelled / "voc", tmp_path / "voc")
    seg = [f"dataset.uri={voc}", f"output={tmp_path / 'seg'}", f"train.pseudo_masks={labelled / 'labels'}", *TINY_TRAIN]
    with pytest.raises(ValueError, match=r"train.pseudo_masks: .*labels was labelled for other classes than this "
                                         r"dataset's \(label 1 is 'circle' there, 'square' here; .*run.json\)"):
        run_train(build_config(TrainConfig, {}, seg))
    aff = [f"dataset.uri={voc}", f"output={tmp_path / 'aff'}", f"train.cams={labelled_cams}",
           "model.backbone=open_clip:tiny", "model.pretrained=none", "model.dims=[8, 8, 16]"]
    with pytest.raises(ValueError, match=r"train.cams: .*cams was labelled for other classes"):
        run_train(build_config(AffinityConfig, {}, aff))
    assert not (tmp_path / "seg").exists() and not (tmp_path / "aff").exists()
    # a folder that is not a labeling output is named as such
    (tmp_path / "bare" / "pseudo").mkdir(parents=True)
    for folder in ("pseudo", "confidence"):
        shutil.copytree(labelled / "labels" / folder, tmp_path / "bare" / folder, dirs_exist_ok=True)
    with pytest.raises(ValueError, match=r"bare/run.json not found: .* is not a `wsss label` output"):
        run_train(build_config(TrainConfig, {}, [*seg[:2], f"dataset.uri={labelled / 'voc'}",
                                                 f"train.pseudo_masks={tmp_path / 'bare'}", *TINY_TRAIN]))


def test_a_missing_pseudo_file_is_named_before_ray_starts(labelled, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(labelled / "labels", labels)
    gone = sorted((labels / "confidence").glob("*.png"))[3]
    gone.unlink()
    with pytest.raises(ValueError, match=rf"train.pseudo_masks: .*confidence/{gone.name} not found \(1 of \d+ images "
                                         r"lack confidence/\)"):
        run_train(build_config(TrainConfig, {}, [f"dataset.uri={labelled / 'voc'}", f"output={tmp_path / 'seg'}",
                                                 f"train.pseudo_masks={labels}", *TINY_TRAIN]))
    assert not (tmp_path / "seg").exists()


@pytest.mark.parametrize("config,name,closest", [(TrainConfig, "not_a_model", None), (ToCoConfig, "resnet5O", "resnet50"),
                                                 (AffinityConfig, "open_clip:ViT-B-17", None),
                                                 (TrainConfig, "open_clip:/nowhere/x.json", None)])
def test_a_backbone_name_nothing_can_build_fails_when_the_config_is_read(config, name, closest, tmp_path):
    with pytest.raises(ConfigError, match=r"model.backbone: (unknown timm model|unknown open_clip model|model config "
                                          r"JSON not found)") as e:
        build_config(config, {}, [f"model.backbone={name}", f"output={tmp_path / 'out'}"])
    if closest:
        assert f"closest: {closest}" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_is_named(tmp_path):
    from wsss_platform.checkpoint import DamagedCheckpoint, load_state

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DamagedCheckpoint, match=rf"{tmp_path}/ckpt/checkpoint.pt does not load \(.*\); it is truncated"):
        load_state(str(tmp_path / "ckpt"))


def test_overrides_are_taken_anywhere_after_the_subcommand():
    from wsss_platform.cli import build_parser, parse

    args = parse(build_parser(), ["train", "segmenter", "train.mu=0", "--output", "o", "train.lr=-1", "--overwrite",
                                  "compute.num_workers=2"])
    assert args.overrides == ["train.mu=0", "train.lr=-1", "compute.num_workers=2"] and args.output == "o"
    assert args.overwrite
    with pytest.raises(SystemExit):
        parse(build_parser(), ["train", "segmenter", "--output", "o", "--no-such-flag"])


def test_each_recipe_says_what_it_is_and_run_names_carry_no_path(capsys):
    from wsss_platform.cli import main
    from wsss_platform.train.job import short_name

    for recipe, own, other in (("toco", "ToCo", "--cams synthshapes"), ("affinity", "--cams synthshapes-train-cams",
                                                                        "pseudo-masks none")):
        with pytest.raises(SystemExit):
            main(["train", recipe, "--help"])
        text = capsys.readouterr().out
        assert own in text and other not in text
    assert short_name("open_clip:/abs/folder/tinyclip.json") == "open_clip:tinyclip"
    assert short_name("open_clip:ViT-B-16") == "open_clip:ViT-B-16" and short_name("resnet101") == "resnet101"


def _attempts(marker: str) -> int:
    """Training-worker processes of this Ray session whose train function failed on ``marker``."""
    logs = Path(__import__("ray")._private.worker._global_node.get_logs_dir_path())
    return sum(1 for f in logs.glob("worker-*") if f.is_file()
               and "Error in training function" in (text := f.read_text(errors="replace")) and marker in text)


def test_a_damaged_pseudo_png_fails_once_naming_it_and_blocks_no_corrected_rerun(labelled, tmp_path, ray_local,
                                                                               monkeypatch):
    """No worker-group restart for an input error; the failed start leaves nothing that refuses a
    rerun with other settings; the finished training run again is a no-op that leaves its run alone."""
    import mlflow
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    labels, out = tmp_path / "labels", tmp_path / "seg"
    shutil.copytree(labelled / "labels", labels)
    damaged = sorted((labels / "pseudo").glob("*.png"))[2]
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 3])
    base = [f"dataset.uri={labelled / 'voc'}", f"output={out}", f"train.pseudo_masks={labels}", *TINY_TRAIN,
            "compute.num_workers=1", "compute.max_failures=3", "train.iterations=3"]
    with pytest.raises(DatasetError, match=rf"cannot decode mask {damaged}: .*relabel it"):
        run_train(build_config(TrainConfig, {}, [*base, "train.iterations=8"]))  # an epoch: every image is read
    time.sleep(2)  # the workers' log files are flushed by their processes
    assert _attempts(str(damaged)) == 1  # max_failures 3, yet one attempt: the input is damaged for every retry
    assert _ray_log_lines(str(damaged))  # the logs have it too

    damaged.write_bytes(good)
    summary = run_train(build_config(TrainConfig, {}, [*base, "train.lr=0.002"]))  # other settings: not refused
    assert summary.iterations == 3 and summary.checkpoint
    client = MlflowClient(db)
    before = client.get_run(summary.run_id)
    models = mlflow.search_logged_models(experiment_ids=[before.info.experiment_id], output_format="list")
    lines: list[str] = []
    again = run_train(build_config(TrainConfig, {}, [*base, "train.lr=0.002"]), log=lines.append)
    assert again.iterations == 3 and again.checkpoint == summary.checkpoint and again.run_id == summary.run_id
    assert len(lines) == 1 and lines[0].startswith(f"[wsss train] nothing to do: {out} holds this training, finished "
                                                   "at iteration 3")
    after = client.get_run(summary.run_id)
    assert after.info.end_time == before.info.end_time and after.info.status == "FINISHED"
    # a sqlite store keeps its artifacts beside itself, not in ./mlruns of the folder the job ran in
    assert after.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert len(mlflow.search_logged_models(experiment_ids=[before.info.experiment_id], output_format="list")) == len(models)


def _start(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


@pytest.mark.slow
def test_ctrl_c_at_two_moments_then_resume_quietly_then_nothing_to_do(labelled, tmp_path):
    """The `wsss train` command in a pipe: SIGINT before the workers start and after the first checkpoint
    each print `interrupted` and exit 130 (the MLflow run KILLED); the rerun continues from the checkpoint,
    clears the error tag, and prints at most 15 lines for 20 iterations with evaluation; once more is a no-op."""
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    out = tmp_path / "seg"
    cmd = [str(Path(sys.executable).parent / "wsss"), "train", "segmenter", "--dataset", str(labelled / "voc"),
           "--pseudo-masks", str(labelled / "labels"), *TINY_TRAIN, "compute.num_workers=1", "train.iterations=20",
           "train.checkpoint_every=5", "train.eval_every=10", "--output", str(out)]

    early = _start(cmd, tmp_path, env)
    _wait_for(out / "train.json", early)  # the MLflow run is open, Ray Train not started yet
    early.send_signal(signal.SIGINT)
    assert early.wait(120) == 130 and early.stdout.read().rstrip().endswith("interrupted")

    late = _start(cmd, tmp_path, env)
    _wait_for(out / "train" / "checkpoint_manager_snapshot.json", late)  # a checkpoint is registered
    late.send_signal(signal.SIGINT)
    assert late.wait(120) == 130 and late.stdout.read().rstrip().endswith("interrupted")
    client = MlflowClient(db)
    run = client.search_runs([client.get_experiment_by_name("wsss-train").experiment_id])[0]
    assert run.info.status == "KILLED" and run.data.tags["wsss.error"].startswith("KeyboardInterrupt")

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    printed = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, printed[-20:]
    assert len(printed) <= 15, printed
    assert not [ln for ln in printed if "\x1b[" in ln or not ln.startswith("[wsss train]")], printed
    assert any(" holds this training: continuing from its checkpoint at iteration " in ln for ln in printed)
    assert any("20/20 iterations (100%)" in ln and "val_miou" in ln for ln in printed)
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and "wsss.error" not in resumed.data.tags
    assert resumed.data.tags["wsss.resumed"] == "true"

    t0 = time.monotonic()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stdout and time.monotonic() - t0 < 60
    assert client.get_run(run.info.run_id).info.end_time == resumed.info.end_time

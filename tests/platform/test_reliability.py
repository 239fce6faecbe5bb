"""A hostile operator's faults: poison images, secrets, reruns with other settings, concurrent jobs,
bad split files, storage outages, leftovers of failed writes. Every job must end, alone-fail the
bad image, keep secrets out of everything it writes, and never mix two settings in one output."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_KEY, TEST_SECRET
from wsss_platform import outputs, storage
from wsss_platform.cli import main
from wsss_platform.config import ConfigError, build_config
from wsss_platform.datasets import DatasetConfig
from wsss_platform.datasets.base import DatasetError, decode_image, encode_jpeg, encode_mask_png
from wsss_platform.datasets.check import check_dataset
from wsss_platform.datasets.demo import write_demo_dataset
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import main_exit_code, run_label
from wsss_platform.ownership import LOCK_NAME, OutputBusy, OutputLock

from .test_label import label_config


def train_ids(voc: Path) -> list[str]:
    return (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def make_big(voc: Path, image_id: str, height: int, width: int) -> None:
    """Replace an image (and its ground truth) with a large one of the same classes."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([(xx * 255 // width), (yy * 255 // height), np.full_like(xx, 128)], -1).astype(np.uint8)
    (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(encode_jpeg(image, quality=50))
    mask = voc / "SegmentationClass" / f"{image_id}.png"
    if mask.exists():
        mask.write_bytes(encode_mask_png(np.zeros((height, width), np.uint8)))


def statuses(out: Path) -> dict[str, tuple[str, str]]:
    import pyarrow.parquet as pq

    return {r["image_id"]: (r["status"], r["error"]) for r in pq.read_table(out / "manifest.parquet").to_pylist()}


# --- poison images -------------------------------------------------------------------------------

def test_image_over_the_size_cap_fails_alone_before_decoding(tmp_path, ray_local):
    voc = tmp_path / "voc"
    write_demo_dataset(str(voc), "voc", 8, seed=41)
    ids = train_ids(voc)
    make_big(voc, ids[1], 1200, 1000)
    cfg = label_config(str(voc), str(tmp_path / "out"), extra=("dataset.max_image_pixels=1000000", "tracking.enabled=false"))
    summary = run_label(cfg)
    got = statuses(tmp_path / "out")
    assert got[ids[1]][0] == "failed"
    assert f"{ids[1]}.jpg is 1000x1200 (1.2 MP), over dataset.max_image_pixels=1000000" in got[ids[1]][1]
    assert {k: v[0] for k, v in got.items() if k != ids[1]} == {k: "done" for k in ids if k != ids[1]}
    assert summary.failed == 1 and main_exit_code(summary, cfg) == 1
    report = check_dataset(DatasetConfig(uri=str(voc), max_image_pixels=1_000_000))
    assert [p.message.split(":")[0] for p in report.problems] == ["too large"]


@pytest.mark.slow
def test_image_that_raises_fails_alone_naming_itself(tmp_path, ray_local):
    """An 8000x6000 image asks CLIP-ES's full-resolution attention for ~421 GB: the allocation
    raises. Its batch is redone image by image, so only it fails, with its id, size and reason."""
    voc = tmp_path / "voc"
    write_demo_dataset(str(voc), "voc", 6, seed=42)
    ids = train_ids(voc)
    make_big(voc, ids[0], 6000, 8000)
    cfg = label_config(str(voc), str(tmp_path / "out"), extra=(
        "dataset.max_image_pixels=null", "compute.memory_per_actor=null", "tracking.enabled=false",
        "compute.batch_size=8", "compute.loader_batch_size=8"))
    summary = run_label(cfg)
    got = statuses(tmp_path / "out")
    status, error = got[ids[0]]
    assert status == "failed" and f"labeling {ids[0]} (8000x6000) failed: " in error
    assert all(got[i][0] == "done" for i in ids[1:]) and summary.done == len(ids) - 1


@pytest.mark.slow
def test_worker_killed_by_one_image_ends_with_exactly_that_image_failed(tmp_path, ray_local):
    """A 1600x1600 image needs >1 GB more than the actor's limit allows: the actor ends itself (as
    an OOM kill would), Ray restarts it and retries the batch, the retry isolates the image, and
    its second death marks it failed. Every other image is labelled once; the job ends."""
    voc = tmp_path / "voc"
    write_demo_dataset(str(voc), "voc", 10, seed=43)
    ids = train_ids(voc)
    make_big(voc, ids[2], 1600, 1600)
    out = tmp_path / "out"
    cfg = label_config(str(voc), str(out), extra=(
        "dataset.max_image_pixels=null", f"compute.memory_per_actor={int(1.8 * 2**30)}", "tracking.enabled=false"))
    t0 = time.monotonic()
    summary = run_label(cfg)
    assert time.monotonic() - t0 < 300
    got = statuses(out)
    assert got[ids[2]][0] == "failed" and f"its worker died while labeling {ids[2]} (1600x1600), twice" in got[ids[2]][1]
    assert {k for k, v in got.items() if v[0] == "done"} == set(ids) - {ids[2]}
    assert summary.done == len(ids) - 1 and summary.failed == 1
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(set(ids) - {ids[2]})
    assert not (out / outputs.INFLIGHT).exists()  # no marker outlives its job


# --- secrets ---------------------------------------------------------------------------------------

def test_validation_errors_and_overrides_mask_secrets():
    with pytest.raises(ConfigError) as e:
        build_config(LabelConfig, {"dataset": {"storage": {"secret": 98765123, "key": ["AKIAOOPS"]}}})
    text = str(e.value)
    assert "dataset.storage.secret" in text and "***" in text
    assert "98765123" not in text and "AKIAOOPS" not in text
    with pytest.raises(ConfigError) as e:
        build_config(LabelConfig, {"dataset": {"storage": "key=AKIAOOPS"}})
    assert "AKIAOOPS" in str(e.value) or "***" in str(e.value)  # a non-dict storage is no secret field
    with pytest.raises(ConfigError) as e:
        build_config(LabelConfig, {}, ["dataset.storage.secret.x=hunter2"])
    assert "hunter2" not in str(e.value)


def test_submit_refuses_secrets_on_the_command_line_and_in_the_config(tmp_path, capsys):
    rc = main(["submit", "label", "--address", "http://127.0.0.1:9", "--dataset", "s3://b/voc",
               "dataset.storage.secret=hunter2"])
    err = capsys.readouterr().err
    assert rc == 2 and "dataset.storage.secret" in err and "hunter2" not in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset:\n  storage:\n    key: AKIAOOPS\n")
    rc = main(["submit", "label", "--address", "http://127.0.0.1:9", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "credentials are not sent with a submitted job" in err and "AKIAOOPS" not in err


def _grep_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n.decode()}" for n in needles if n in data]
    return hits


@pytest.mark.slow  # ~3 min: a labeling job, a sweep, a training and a prediction on S3
def test_no_secret_in_anything_labeling_sweep_training_prediction_and_review_write(s3_bucket, ray_local, tmp_path, monkeypatch,
                                                                                  capfd):
    """Everything written (S3 outputs, Tune state, MLflow store and artifacts, Ray's session logs,
    the terminal; a review export and its import too) is grepped for the access key and secret in use: no hit."""
    import s3fs
    from ray._private import worker

    from .test_sweep import sweep_file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) land here too
    write_demo_dataset(f"{s3_bucket}/voc", "voc", 8, seed=44)
    cfg = label_config(f"{s3_bucket}/voc", f"{s3_bucket}/labels")
    assert run_label(cfg).failed == 0
    from wsss_platform.sweep.config import load_sweep_config
    from wsss_platform.sweep.job import run_sweep

    path = sweep_file(tmp_path, Path("unused"), output=f"{s3_bucket}/sweep",
                      tune={"num_trials": 2, "max_concurrent_trials": 1}, tracking={"experiment": "secret-grep"})
    scfg, dims = load_sweep_config(path, [f"label.dataset.uri={s3_bucket}/voc"])
    assert run_sweep(scfg, dims).complete >= 1
    from wsss_platform.predict.config import PredictConfig
    from wsss_platform.predict.job import run_predict
    from wsss_platform.train.config import TrainConfig
    from wsss_platform.train.job import run_train

    from .test_train import TINY_TRAIN

    trained = run_train(build_config(TrainConfig, {}, [
        f"dataset.uri={s3_bucket}/voc", f"output={s3_bucket}/seg", f"train.pseudo_masks={s3_bucket}/labels", *TINY_TRAIN,
        "compute.num_workers=1", "train.iterations=2", "train.checkpoint_every=2", "tracking.experiment=secret-grep"]))
    assert run_predict(build_config(PredictConfig, {}, [
        f"checkpoint={trained.checkpoint}", f"dataset.uri={s3_bucket}/voc", f"output={s3_bucket}/pred",
        "tracking.experiment=secret-grep"])).failed == 0
    from wsss_platform.handoff.job import ExportConfig, ImportConfig, run_export, run_import

    run_export(ExportConfig(f"{s3_bucket}/labels", "cvat", f"{s3_bucket}/review"))  # and the table on its run
    run_import(ImportConfig("cvat", f"{s3_bucket}/review/cvat.zip", f"{s3_bucket}/labels", output=f"{s3_bucket}/reviewed"))

    needles = [TEST_KEY.encode(), TEST_SECRET.encode()]
    fs = s3fs.S3FileSystem()
    s3_hits = [f"{p}: {n.decode()}" for p in fs.find(s3_bucket.removeprefix("s3://"))
               for n in needles if n in fs.cat_file(p)]
    local_hits = _grep_tree(tmp_path, needles)
    ray_hits = _grep_tree(Path(worker._global_node.get_session_dir_path()), needles)
    printed = capfd.readouterr()
    term_hits = [n.decode() for n in needles if n.decode() in printed.out + printed.err]
    assert not s3_hits and not local_hits and not ray_hits and not term_hits, (s3_hits, local_hits, ray_hits, term_hits)
    assert (tmp_path / "mlflow.db").exists() and list(tmp_path.rglob("preview.png"))  # MLflow's store was there to grep
    assert fs.find(f"{s3_bucket.removeprefix('s3://')}/sweep/tune")  # Tune's state was there to grep


def test_config_credentials_with_a_running_cluster_are_refused(tmp_path, ray_local):
    write_demo_dataset(str(tmp_path / "voc"), "voc", 4, seed=45)
    cfg = label_config(str(tmp_path / "voc"), str(tmp_path / "out"),
                       extra=("dataset.storage.key=AKIAOOPS", "dataset.storage.secret=hunter2", "tracking.enabled=false"))
    with pytest.raises(ConfigError, match="whose workers cannot inherit them") as e:
        run_label(cfg)
    assert "hunter2" not in str(e.value) and not (tmp_path / "out").exists()
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != "hunter2"  # refused before anything was exported


# --- one output, one setting, one job -----------------------------------------------------------------

@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_naming_them(tmp_path, ray_local):
    write_demo_dataset(str(tmp_path / "voc"), "voc", 6, seed=46)
    out = tmp_path / "out"
    base = ("tracking.enabled=false",)
    assert run_label(label_config(str(tmp_path / "voc"), str(out), extra=base)).failed == 0
    masks = {p.name: p.read_bytes() for p in (out / "masks").glob("*.png")}
    with pytest.raises(ConfigError, match=r"holds pseudo masks made with other settings \(changed: caa\.t \(2 -> 3\)\)"):
        run_label(label_config(str(tmp_path / "voc"), str(out), extra=(*base, "caa.t=3")))
    assert {p.name: p.read_bytes() for p in (out / "masks").glob("*.png")} == masks  # untouched
    assert json.loads((out / "run.json").read_text())["settings"]["caa"]["t"] == 2
    # settings that do not shape the masks (batching, tracking) are not a different output
    again = run_label(label_config(str(tmp_path / "voc"), str(out), extra=(*base, "compute.batch_size=2")))
    assert again.skipped == len(masks) and again.processed == 0
    # --overwrite redoes the output with the new settings
    redo = run_label(label_config(str(tmp_path / "voc"), str(out), extra=(*base, "caa.t=3", "overwrite=true")))
    assert redo.processed == len(masks) and json.loads((out / "run.json").read_text())["settings"]["caa"]["t"] == 3


def test_a_second_job_on_a_locked_output_is_refused_until_the_lease_ends(tmp_path, ray_local):
    write_demo_dataset(str(tmp_path / "voc"), "voc", 4, seed=47)
    out = tmp_path / "out"
    cfg = label_config(str(tmp_path / "voc"), str(out), extra=("tracking.enabled=false",))
    with OutputLock(str(out), None, "wsss label"), pytest.raises(OutputBusy, match="is in use by another wsss label job"):
        run_label(cfg)
    assert not (out / "run.json").exists()
    # a lock whose lease ran out (its job was killed) is taken over
    (out / LOCK_NAME).write_text(json.dumps({"owner": "dead", "job": "wsss label", "pid": 1, "expires_at": time.time() - 1}))
    assert run_label(cfg).done == len(train_ids(tmp_path / "voc"))
    assert not (out / LOCK_NAME).exists()  # released at the end
    # a lock within its lease whose holder ran here and is gone (a killed driver) is taken over at once
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"owner": "dead", "job": "wsss label", "host": socket.gethostname(),
                                             "pid": dead.pid, "expires_at": time.time() + 60}))
    assert run_label(cfg.model_copy(update={"overwrite": True})).done == len(train_ids(tmp_path / "voc"))


def test_lock_on_s3_is_exclusive(s3_bucket):
    first = OutputLock(f"{s3_bucket}/out", None, "wsss label", lease_s=30)
    first.acquire()
    try:
        with pytest.raises(OutputBusy):
            OutputLock(f"{s3_bucket}/out", None, "wsss sweep").acquire()
    finally:
        first.release()
    with OutputLock(f"{s3_bucket}/out", None, "wsss sweep"):
        assert storage.exists(f"{s3_bucket}/out/{LOCK_NAME}")
    assert not storage.exists(f"{s3_bucket}/out/{LOCK_NAME}")


# --- split files -------------------------------------------------------------------------------------

def test_duplicate_ids_are_reported_and_labelled_once(tmp_path, ray_local):
    voc = tmp_path / "voc"
    write_demo_dataset(str(voc), "voc", 6, seed=48)
    ids = train_ids(voc)
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text("\n".join([*ids, ids[0], ids[2]]) + "\n")
    report = check_dataset(DatasetConfig(uri=str(voc)))
    assert not report.ok and any("2 duplicate ids" in p.message and ids[0] in p.message for p in report.problems)
    cfg = label_config(str(voc), str(tmp_path / "out"), extra=("tracking.enabled=false",))
    summary = run_label(cfg)
    assert summary.total == len(ids) and summary.done == len(ids) and summary.failed == 0
    assert main_exit_code(summary, cfg) == 0


def test_empty_split_is_a_clear_error_before_anything_is_written(tmp_path, capsys):
    voc = tmp_path / "voc"
    write_demo_dataset(str(voc), "voc", 4, seed=49)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    rc = main(["label", "--dataset", str(voc), "--output", str(tmp_path / "out"), "model.name=tiny"])
    assert rc == 2 and "lists no images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- storage ---------------------------------------------------------------------------------------

def test_storage_errors_say_what_is_wrong(s3_server, tmp_path):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.read_bytes("s3://no-such-bucket-here/voc/ImageSets/Segmentation/train.txt")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.exists("s3://no-such-bucket-here/voc/classes.txt")
    with pytest.raises(DatasetError, match=r"x\.jpg: the file is empty \(0 bytes\)"):
        decode_image(b"", "x.jpg")
    with pytest.raises(DatasetError) as e:
        decode_image(b"not an image at all", "y.jpg")
    assert "not a recognised image format (19 bytes)" in str(e.value) and "BytesIO" not in str(e.value)
    # a failed local write leaves no temporary behind
    target = tmp_path / "a.png"
    target.mkdir()  # os.replace onto a folder fails after the temporary is written
    with pytest.raises(storage.StorageError):
        storage.write_bytes(str(target), b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.slow
def test_no_temporaries_left_after_a_failed_then_successful_run(tmp_path, ray_local):
    write_demo_dataset(str(tmp_path / "voc"), "voc", 6, seed=50)
    ids = train_ids(tmp_path / "voc")
    out = tmp_path / "out"
    (out / "masks" / f"{ids[0]}.png").mkdir(parents=True)  # its mask cannot be written
    (out / "cams").mkdir()
    (out / "cams" / f"{ids[1]}.npz.tmp-0123abcd").write_bytes(b"half")  # as a killed writer leaves it
    cfg = label_config(str(tmp_path / "voc"), str(out), extra=("tracking.enabled=false",))
    first = run_label(cfg)
    assert first.failed == 1 and "writing" in dict(first.failures)[ids[0]]
    assert not list(out.rglob("*.tmp-*"))
    (out / "masks" / f"{ids[0]}.png").rmdir()
    second = run_label(cfg)
    assert second.processed == 1 and second.done == len(ids) and second.failed == 0
    assert not list(out.rglob("*.tmp-*"))


class FlakyProxy:
    """A TCP proxy in front of the moto server whose link can be cut: during an outage it refuses
    connections and drops open ones, as a storage endpoint that goes away does; moto keeps its data."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.up = threading.Event()
        self.up.set()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def outage(self, seconds: float) -> None:
        self.up.clear()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self.conns = []
        time.sleep(seconds)
        self.up.set()


@pytest.mark.slow
def test_an_s3_outage_of_a_few_seconds_fails_no_image(s3_bucket, s3_server, ray_local, tmp_path):
    proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    endpoint = f"http://127.0.0.1:{proxy.port}"
    write_demo_dataset(f"{s3_bucket}/voc", "voc", 24, seed=51)
    cfg = label_config(f"{s3_bucket}/voc", f"{s3_bucket}/out", extra=(
        f"dataset.storage.endpoint_url={endpoint}", "tracking.enabled=false", "compute.batch_size=2",
        "compute.loader_batch_size=2"))
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_label(cfg)))
    job.start()
    deadline = time.monotonic() + 240
    while not storage.list_names(f"{s3_bucket}/out/{outputs.PARTS}") and time.monotonic() < deadline:
        time.sleep(0.2)
    proxy.outage(5.0)
    job.join(timeout=600)
    summary = result["summary"]
    assert summary.failed == 0 and summary.done == summary.total > 0, summary.failures
    assert summary.processed == summary.total  # the outage hit while the job ran, not before it

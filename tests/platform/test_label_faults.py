"""Crashes: an interrupted driver resumes without redoing or losing work; a killed actor is replaced."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import kill_processes_with_env
from wsss_platform import outputs
from wsss_platform.datasets.demo import write_demo_dataset
from wsss_platform.label.job import run_label

from .test_label import TINY, label_config

BIN = Path(sys.executable).parent


def wait_for_parts(out: Path, n: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = list((out / outputs.PARTS).glob("*.parquet")) if (out / outputs.PARTS).exists() else []
        if len(parts) >= n:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (code {proc.returncode}) before it could be interrupted")
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {n} manifest parts after {timeout}s")


def assert_exactly_once(out: Path, ids: list[str]) -> None:
    manifest = outputs.read_parts(str(out)).to_pylist()
    assert sorted(r["image_id"] for r in manifest) == sorted(ids)
    assert {r["status"] for r in manifest} == {"done"}
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted(ids)
    for p in (out / "masks").glob("*.png"):
        with Image.open(p) as im:  # complete files only: every mask decodes
            np.asarray(im)
    assert not list(out.rglob("*.tmp-*"))


@pytest.mark.slow
def test_killed_driver_resumes_exactly_once(tmp_path, ray_local):
    splits = write_demo_dataset(str(tmp_path / "voc"), "voc", 30, seed=21)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    cmd = [str(BIN / "wsss"), "label", "--dataset", str(tmp_path / "voc"), "--output", str(out), *TINY,
           "compute.batch_size=2", "tracking.enabled=false"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_parts(out, 2, timeout=240, proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: no clean shutdown, no manifest.parquet
        proc.wait(30)
    finally:
        kill_processes_with_env("RAY_TMPDIR", ray_tmp)  # its local Ray too, actors included
    done_before = {r["image_id"] for r in outputs.read_parts(str(out)).to_pylist() if r["status"] == "done"}
    assert 0 < len(done_before) < len(splits["train"])
    assert not (out / "manifest.parquet").exists()

    cfg = label_config(str(tmp_path / "voc"), str(out), extra=("compute.batch_size=2", "tracking.enabled=false"))
    second = run_label(cfg)
    assert second.skipped == len(done_before)
    assert second.processed == len(splits["train"]) - len(done_before)
    assert second.done == len(splits["train"]) and second.failed == 0
    assert_exactly_once(out, splits["train"])


@pytest.mark.slow
def test_killed_actor_is_restarted_and_every_image_done_once(tmp_path, ray_local):
    splits = write_demo_dataset(str(tmp_path / "voc"), "voc", 30, seed=22)
    out = tmp_path / "out"
    cfg = label_config(str(tmp_path / "voc"), str(out), extra=("compute.batch_size=2", "tracking.enabled=false"))
    result = {}
    job = threading.Thread(target=lambda: result.update(summary=run_label(cfg)))
    job.start()
    wait_for_parts(out, 1, timeout=240)
    victims = [p for p in psutil.process_iter(["cmdline"]) if "Labeler" in " ".join(p.info["cmdline"] or [])]
    assert victims, "no labeling actor process found"
    killed = {v.pid for v in victims}
    for v in victims:
        v.kill()  # SIGKILL, mid-run
    job.join(timeout=600)
    assert not job.is_alive()
    summary = result["summary"]
    assert summary.done == len(splits["train"]) and summary.failed == 0
    assert_exactly_once(out, splits["train"])
    # Raw parts, before de-duplication: a batch whose part was written just before the kill is
    # retried and written again, which the manifest merge collapses to one row per image.
    import pyarrow.parquet as pq

    workers = {w.rsplit(":", 1)[1] for part in (out / outputs.PARTS).glob("*.parquet")
               for w in pq.read_table(part).column("worker").to_pylist()}
    assert workers & {str(p) for p in killed}, "the killed actor had written work before it died"
    assert workers - {str(p) for p in killed}, "a replacement actor finished the rest"

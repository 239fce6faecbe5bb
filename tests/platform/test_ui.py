"""What a person sees: the terminal of a labeling job and a sweep, `wsss ui`, and the runs in a real
MLflow UI driven by a real headless Chromium (the OS package)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, wait_for_port
from wsss_platform.cli import main
from wsss_platform.datasets.demo import write_demo_dataset

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("WSSS_TEST_ARTIFACTS", REPO / "test-artifacts"))
TEMPLATES = ["a photo of a {}.", "a clean origami {}.", "a {}.", "a drawing of a {}."]
URL = re.compile(r"MLflow run: (http\S+)")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, mlflow_server):
    """A labeling job and a 4-trial sweep run as a person runs them: `wsss` in a shell, output piped
    to a log file, tracking to a real MLflow server."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("ui")
    write_demo_dataset(str(root / "voc"), "voc", 8, seed=61)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    label_cmd = [str(BIN / "wsss"), "label", "--dataset", "voc", "--output", "labels", "model.name=tiny",
                 "model.pretrained=none", "refine=[caa]", "compute.batch_size=2", "compute.loader_batch_size=2"]
    t0 = time.monotonic()
    with open(root / "label.log", "w") as log:
        label_rc = subprocess.run(label_cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode
    label_wall = time.monotonic() - t0
    sweep = {"label": {"dataset": {"uri": "voc"}, "model": {"name": "tiny", "pretrained": "none"}, "refine": ["caa"],
                       "tracking": {"preview_images": 2}},
             "objective": "miou", "subset": {"num_images": 6},
             "search_space": {"text.template": {"choices": TEMPLATES}},
             "tune": {"num_trials": 4, "max_concurrent_trials": 1, "report_chunks": 1, "seed": 2}, "output": "sweep"}
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with open(root / "sweep.log", "w") as log:
        sweep_rc = subprocess.run([str(BIN / "wsss"), "sweep", "--config", "sweep.yaml"], cwd=root, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=600).returncode
    label_log, sweep_log = (root / "label.log").read_text(), (root / "sweep.log").read_text()
    assert label_rc == 0, label_log[-3000:]
    assert sweep_rc == 0, sweep_log[-3000:]
    return {"root": root, "env": env, "label_cmd": label_cmd, "label_log": label_log, "sweep_log": sweep_log,
            "label_wall": label_wall, "client": MlflowClient(mlflow_server), "server": mlflow_server,
            "label_url": URL.search(label_log).group(1), "sweep_url": URL.search(sweep_log).group(1)}


def _run(client, url: str):
    return client.get_run(url.split("/runs/")[1].split("?")[0])


def test_terminal_shows_progress_and_little_else(jobs):
    log = jobs["label_log"]
    assert re.search(r"\[wsss label\] 6/6 images \(100%\) · [\d.]+ img/s", log), log  # in a piped log too
    assert "Started a local Ray instance" not in log and "logging_progress" not in log
    sweep = jobs["sweep_log"].splitlines()
    assert len(sweep) < 40, "\n".join(sweep)
    assert sum(bool(re.match(r"\[wsss sweep\] trial \d+ · \w{8} \(\d/4\) · miou ", ln)) for ln in sweep) == 4
    assert not [ln for ln in sweep if "tensorboard" in ln.lower() or "╭" in ln]


def test_runs_say_what_they_are(jobs):
    client = jobs["client"]
    run = _run(client, jobs["label_url"])
    assert run.info.run_name == "label voc/train clip_es+caa"
    assert run.info.status == "FINISHED"
    assert (run.info.end_time - run.info.start_time) / 1000 >= jobs["label_wall"] - 25  # opened at the start, see below
    tags = run.data.tags
    assert tags["wsss.dataset"].endswith("voc") and tags["wsss.split"] == "train" and tags["wsss.cam_source"] == "clip_es"
    assert tags["wsss.refiner"] == "caa" and tags["wsss.model"] == "tiny (none)" and len(tags["wsss.code_version"]) == 12
    assert "random weights" in tags["wsss.warning"] and "meaningless" in tags["mlflow.note.content"]
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["voc/train"]
    history = client.get_metric_history(run.info.run_id, "images_done")
    assert history and history[-1].value == 6
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class_iou.json", "per_class_iou.png", "preview.png", "manifest.parquet", "run.json"} <= arts
    parent = _run(client, jobs["sweep_url"])
    assert parent.info.run_name == "sweep voc/train miou (4 trials)" and parent.info.status == "FINISHED"
    assert parent.data.params["subset.num_images"] == "6"  # the images used, not the ones asked for
    assert "preview_best.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name.split(" · ")[0] for c in children) == [f"trial {i}" for i in range(1, 5)]
    for c in children:
        assert not [k for k in c.data.metrics if k.startswith("config/") or k in ("time_this_iter_s", "training_iteration")]
        assert "miou" in c.data.metrics


def test_run_duration_is_the_jobs_and_a_failed_job_is_failed(jobs, tmp_path):
    """The run is opened before the work: its duration covers the labeling, not the last 150 ms."""
    from wsss_platform.config import build_config
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.job import run_label

    client = jobs["client"]
    os.environ["MLFLOW_TRACKING_URI"] = jobs["server"]
    try:
        write_demo_dataset(str(tmp_path / "voc"), "voc", 6, seed=62)
        first = (tmp_path / "voc" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
        bad = tmp_path / "voc" / "JPEGImages" / f"{first}.jpg"
        bad.write_bytes(b"")
        cfg = build_config(LabelConfig, {}, [f"dataset.uri={tmp_path / 'voc'}", f"output={tmp_path / 'out'}",
                                             "model.name=tiny", "model.pretrained=none", "refine=[caa]"])
        t0 = time.monotonic()
        summary = run_label(cfg)
        wall = time.monotonic() - t0
        run = client.get_run(summary.run_id)
        assert summary.failed == 1 and run.info.status == "FAILED" and "above max_failed_fraction" in run.data.tags["wsss.error"]
        assert (run.info.end_time - run.info.start_time) / 1000 >= summary.seconds - 1
        assert wall - (run.info.end_time - run.info.start_time) / 1000 < 20  # only dataset opening and the lock before
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_a_rerun_with_nothing_to_do_logs_no_run(jobs):
    client = jobs["client"]
    exp = _run(client, jobs["label_url"]).info.experiment_id
    before = len(client.search_runs([exp]))
    out = subprocess.run(jobs["label_cmd"], cwd=jobs["root"], env=jobs["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to do" in out.stdout and out.stdout.count(jobs["label_url"]) == 1  # said once, with the UI hint
    assert len(client.search_runs([exp])) == before


def test_a_small_categorical_space_is_enumerated_once_each(jobs):
    import csv

    rows = list(csv.DictReader((jobs["root"] / "sweep" / "trials.csv").open()))
    assert sorted(r["param:text.template"] for r in rows) == sorted(TEMPLATES)


def test_did_you_mean_and_no_silent_default_dataset(capsys, tmp_path):
    assert main(["label", "--output", str(tmp_path / "o"), "mask.bg_valu=0.3"]) == 2
    assert "mask.bg_valu: unknown key (did you mean mask.bg_value?)" in capsys.readouterr().err
    assert main(["label", "--output", str(tmp_path / "o")]) == 2
    assert "no dataset: pass --dataset URI" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"wsss \S+ \(commit \w+\)", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "wsss sweep --config" in text and "label." in text


# --- wsss ui -----------------------------------------------------------------------------------

def _bare_env(**extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), **extra}


def test_wsss_ui_from_a_bare_shell_serves_and_stops(tmp_path):
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # a real, empty store here
    port = free_port()
    proc = subprocess.Popen([str(BIN / "wsss"), "ui", "--port", str(port)], cwd=tmp_path, env=_bare_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc, timeout=90)
        # a second UI on the same port is refused, non-zero
        taken = subprocess.run([str(BIN / "wsss"), "ui", "--port", str(port)], cwd=tmp_path, env=_bare_env(),
                               capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1 and "already in use" in taken.stderr
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "0 runs (empty: run a job to fill it)" in out and "workflowType=machine_learning" in out
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "SIGTERM left the MLflow server running"


def test_wsss_ui_without_a_store_says_where_it_looked(tmp_path):
    out = subprocess.run([str(BIN / "wsss"), "ui", "--port", str(free_port())], cwd=tmp_path, env=_bare_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"no MLflow store at {tmp_path / 'mlflow.db'}" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


# --- the MLflow UI in a real browser -------------------------------------------------------------

def _wait_text(browser, text: str, timeout: float = 60) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in browser.find_element(By.TAG_NAME, "body").text:
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not on {browser.current_url}:\n{browser.find_element(By.TAG_NAME, 'body').text[:2000]}")


def test_the_printed_urls_open_the_runs_in_a_browser(jobs, browser):
    from selenium.webdriver.common.by import By

    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(jobs["label_url"])
    _wait_text(browser, "label voc/train clip_es+caa")
    _wait_text(browser, "miou")
    assert "Evaluations" not in browser.find_element(By.TAG_NAME, "body").text  # the classic runs view, not GenAI's
    browser.save_screenshot(str(SHOTS / "label-run.png"))
    base, query = jobs["label_url"].split("?")
    browser.get(f"{base}/artifacts/preview.png?{query}")  # the Artifacts tab, preview.png selected
    _wait_text(browser, "per_class_iou.json")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # MLflow shows an image artifact from a blob: URL once it has fetched it
        imgs = [i for i in browser.find_elements(By.TAG_NAME, "img") if (i.get_attribute("src") or "").startswith("blob:")]
        if imgs and browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", imgs[0]):
            break
        time.sleep(0.5)
    else:
        browser.save_screenshot(str(SHOTS / "label-preview-failed.png"))
        srcs = [i.get_attribute("src") for i in browser.find_elements(By.TAG_NAME, "img")]
        raise AssertionError(f"the preview image did not render; images on the page: {srcs}")
    browser.save_screenshot(str(SHOTS / "label-preview.png"))

    browser.get(jobs["sweep_url"])
    _wait_text(browser, "sweep voc/train miou (4 trials)")
    browser.save_screenshot(str(SHOTS / "sweep-parent.png"))
    experiment = jobs["sweep_url"].split("/runs/")[0] + "?workflowType=machine_learning"
    browser.get(experiment)
    _wait_text(browser, "sweep voc/train miou")
    toggle = browser.find_element(By.XPATH, "//button[contains(@data-component-id, 'runnamecellrenderer')]")
    browser.execute_script("arguments[0].click();", toggle)
    _wait_text(browser, "trial 4 ·")
    browser.save_screenshot(str(SHOTS / "sweep-children.png"))


@pytest.fixture(scope="module")
def trained(jobs):
    """`wsss train segmenter` (4 iterations, validated twice) and `wsss predict` on its checkpoint, from a
    shell, tracking to the same MLflow server."""
    from .test_train import TINY_TRAIN

    root, env = jobs["root"], jobs["env"]
    logs = {}
    for name, cmd in {
        "train": ["train", "segmenter", "--dataset", "voc", "--pseudo-masks", "none", "--output", "seg", *TINY_TRAIN,
                  "compute.num_workers=1", "train.iterations=4", "train.eval_every=2", "train.checkpoint_every=2"],
        "predict": ["predict", "--checkpoint", "seg", "--dataset", "voc", "--split", "val", "--output", "pred"],
    }.items():
        with open(root / f"{name}.log", "w") as log:
            rc = subprocess.run([str(BIN / "wsss"), *cmd], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=600).returncode
        logs[name] = (root / f"{name}.log").read_text()
        assert rc == 0, logs[name][-3000:]
    return {name: URL.search(text).group(1) for name, text in logs.items()}


def _artifact_image_renders(browser, shot: str) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        imgs = [i for i in browser.find_elements(By.TAG_NAME, "img") if (i.get_attribute("src") or "").startswith("blob:")]
        if imgs and browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", imgs[0]):
            browser.save_screenshot(str(SHOTS / shot))
            return
        time.sleep(0.5)
    browser.save_screenshot(str(SHOTS / f"failed-{shot}"))
    raise AssertionError(f"no rendered image artifact on {browser.current_url}")


def _scroll_through(browser, shot: str) -> str:
    """Scroll every scrollable part of the page to its end in screen-sized steps; the page's text seen on the way."""
    from selenium.webdriver.common.by import By

    seen = browser.find_element(By.TAG_NAME, "body").text
    for step in range(40):
        moved = browser.execute_script("""
            let moved = false;
            for (const el of document.querySelectorAll('*')) {
              if (el.scrollHeight > el.clientHeight + 20 && getComputedStyle(el).overflowY.match(/auto|scroll/)
                  && el.scrollTop + el.clientHeight < el.scrollHeight - 2) {
                el.scrollTop += el.clientHeight * 0.8; moved = true;
              }
            }
            return moved;""")
        time.sleep(1.0)
        seen += "\n" + browser.find_element(By.TAG_NAME, "body").text
        if step == 0:
            browser.save_screenshot(str(SHOTS / shot))
        if not moved:
            break
    (SHOTS / f"{shot}.txt").write_text(seen)
    return seen


@pytest.mark.slow  # a training and a prediction run first (~3 min)
def test_a_training_run_shows_its_curves_its_logged_model_and_its_preview(jobs, trained, browser):
    from selenium.webdriver.common.by import By

    SHOTS.mkdir(parents=True, exist_ok=True)
    run = _run(jobs["client"], trained["train"])
    assert [m.step for m in jobs["client"].get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert len(jobs["client"].get_metric_history(run.info.run_id, "val_miou")) == 2
    base, query = trained["train"].split("?")
    browser.get(trained["train"])
    _wait_text(browser, "train voc/train segmenter")
    _wait_text(browser, "Logged models")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "model" in body.split("Logged models", 1)[1][:400]  # the logged model, listed on the run's page
    browser.save_screenshot(str(SHOTS / "train-run.png"))
    browser.get(f"{base}/model-metrics?{query}")  # the run's metric charts
    _wait_text(browser, "val_iou")
    # the charts render as they scroll into view: scroll the page through, as a person would
    seen = _scroll_through(browser, "train-curves.png")
    for curve in ("loss", "val_miou", "images_per_s"):
        assert f"train voc/train segmenter open_clip:tiny ({curve})" in seen, f"no {curve} chart; see {SHOTS}"
    assert browser.find_elements(By.CSS_SELECTOR, "canvas, svg .main-svg, .js-plotly-plot"), "no chart drawn"
    browser.get(f"{base}/artifacts/preview.png?{query}")
    _wait_text(browser, "per_class_val_iou.json")
    _artifact_image_renders(browser, "train-preview.png")


@pytest.mark.slow  # a training and a prediction run first (~3 min)
def test_a_predict_run_shows_its_scores_and_preview(jobs, trained, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    run = _run(jobs["client"], trained["predict"])
    assert 0 <= run.data.metrics["miou"] <= 1
    browser.get(trained["predict"])
    _wait_text(browser, "predict voc")
    _wait_text(browser, "miou")
    browser.save_screenshot(str(SHOTS / "predict-run.png"))
    base, query = trained["predict"].split("?")
    browser.get(f"{base}/artifacts/preview.png?{query}")
    _wait_text(browser, "per_class_iou.json")
    _artifact_image_renders(browser, "predict-preview.png")

"""`wsss label` with the synthshapes model reproduces the reference figures (bg 0.5) within ±0.01."""

import pytest

from tests.conftest import REPO
from wsss_platform.config import load_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import run_label


def test_synthshapes_label_matches_reference(synthshapes, ray_local, tmp_path, monkeypatch, mlflow_server):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(REPO)  # the example config's paths are relative to the repo root
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = load_config(LabelConfig, REPO / "jobs" / "configs" / "synthshapes.yaml", [f"output={tmp_path / 'out'}"])
    summary = run_label(cfg)
    assert summary.done == 200
    assert summary.miou_raw == pytest.approx(0.526, abs=0.01)  # Softmax-GradCAM, bg 0.5
    assert summary.miou == pytest.approx(0.552, abs=0.01)  # + CAA, bg 0.5
    metrics = MlflowClient(mlflow_server).get_run(summary.run_id).data.metrics
    assert metrics["miou_raw"] == pytest.approx(summary.miou_raw) and metrics["miou"] == pytest.approx(summary.miou)

"""`wsss demo` (what `make demo` runs) writes data, checks it and leaves a run in MLflow."""

import os

from wsss_platform.cli import main


def test_demo_labels_end_to_end(tmp_path, monkeypatch, capsys, ray_local):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--workdir", str(tmp_path), "--num-images", "6", "--offline"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "wsss ui" in out
    assert "RANDOM tiny CLIP" in out  # no network here: said plainly
    assert f"output folder: {tmp_path / 'demo-output'}" in out and "pseudo-mask mIoU" in out
    assert len(list((tmp_path / "demo-output" / "masks").glob("*.png"))) == 5
    assert (tmp_path / "demo-data" / "voc" / "classes.txt").exists()
    assert (tmp_path / "mlflow.db").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("wsss-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert runs[0].data.metrics["images_done"] == 5 and "miou" in runs[0].data.metrics
    assert runs[0].data.params["model.name"] == "tiny"
    assert "preview.png" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert os.path.isdir(tmp_path / "mlartifacts")

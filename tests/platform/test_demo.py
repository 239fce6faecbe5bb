"""`wsss demo` (what `make demo` runs) writes data, checks it and leaves a run in MLflow."""

import os

from wsss_platform.cli import main


def test_demo_logs_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--workdir", str(tmp_path), "--num-images", "6"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "wsss ui" in out
    assert (tmp_path / "demo-data" / "voc" / "classes.txt").exists()
    assert (tmp_path / "mlflow.db").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("wsss-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert runs[0].data.metrics["images"] == 5 and runs[0].data.metrics["problems"] == 0
    assert runs[0].data.params["dataset.layout"] == "voc"
    assert "data_check.txt" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert os.path.isdir(tmp_path / "mlartifacts")

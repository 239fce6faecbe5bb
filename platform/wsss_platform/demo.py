"""``make demo``: generate the demo dataset, check it, and log the run to MLflow."""

from __future__ import annotations

from pathlib import Path


def run_demo(workdir: str = ".", num_images: int = 40) -> int:
    import mlflow

    from wsss_platform import tracking
    from wsss_platform.datasets import DatasetConfig
    from wsss_platform.datasets.check import check_dataset
    from wsss_platform.datasets.demo import write_demo_dataset

    root = Path(workdir).resolve()
    data_uri = str(root / "demo-data" / "voc")
    if not (Path(data_uri) / "ImageSets" / "Segmentation" / "train.txt").exists():
        write_demo_dataset(data_uri, "voc", num_images, seed=0)
        print(f"[demo] wrote {num_images} synthetic scenes to {data_uri}")
    else:
        print(f"[demo] reusing the demo dataset in {data_uri}")
    cfg = DatasetConfig(uri=data_uri, layout="voc", split="train")
    report = check_dataset(cfg)
    print(report.format())
    exp_id = tracking.setup("wsss-demo", root)
    with mlflow.start_run(experiment_id=exp_id, run_name="demo-data-check") as run:
        tracking.log_params_flat({"dataset.uri": data_uri, "dataset.layout": "voc", "dataset.split": "train"})
        mlflow.log_metrics({"images": report.num_images, "masks": report.num_masks, "problems": len(report.problems)})
        mlflow.log_text(report.format(max_problems=1000), "data_check.txt")
    print(f"[demo] MLflow run {run.info.run_id} in {tracking.tracking_uri(root)}")
    print("[demo] open the UI:  .venv/bin/wsss ui   (then http://127.0.0.1:5000, experiment 'wsss-demo')")
    return 0 if report.ok else 1

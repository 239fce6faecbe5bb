"""``make demo``: generate a demo dataset, check it, label it end to end with Ray, log to MLflow."""

from __future__ import annotations

from pathlib import Path


def openai_weights_available() -> bool:
    """True when open_clip can fetch the OpenAI ViT-B/16 weights (network or local cache)."""
    import os

    # Fail fast on a machine without network instead of retrying for a minute.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        import open_clip

        open_clip.create_model("ViT-B-16", pretrained="openai")
        return True
    except Exception:
        return False


def run_demo(workdir: str = ".", num_images: int = 40, offline: bool = False) -> int:
    from wsss_platform import tracking
    from wsss_platform.config import build_config
    from wsss_platform.datasets import DatasetConfig
    from wsss_platform.datasets.check import check_dataset
    from wsss_platform.datasets.demo import write_demo_dataset
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.job import main_exit_code, run_label

    root = Path(workdir).resolve()
    data_uri = str(root / "demo-data" / "voc")
    if not (Path(data_uri) / "ImageSets" / "Segmentation" / "train.txt").exists():
        write_demo_dataset(data_uri, "voc", num_images, seed=0)
        print(f"[demo] wrote {num_images} synthetic scenes to {data_uri}")
    else:
        print(f"[demo] reusing the demo dataset in {data_uri}")
    report = check_dataset(DatasetConfig(uri=data_uri, layout="voc", split="train"))
    print(report.format())
    if not report.ok:
        return 1
    if not offline and openai_weights_available():
        model = ["model.name=ViT-B-16", "model.pretrained=openai"]
        print("[demo] using CLIP ViT-B/16 with OpenAI weights")
    else:
        model = ["model.name=tiny", "model.pretrained=none"]
        why = "--offline was given" if offline else "the OpenAI ViT-B/16 weights cannot be downloaded here (no network or no cache)"
        print(f"[demo] {why}: running the "
              "RANDOM tiny CLIP instead, so the mechanics show but the masks and mIoU are meaningless")
    out = str(root / "demo-output")
    cfg = build_config(LabelConfig, {}, [f"dataset.uri={data_uri}", f"output={out}", *model, "refine=[caa]",
                                         "compute.batch_size=8", "tracking.experiment=wsss-demo", "overwrite=true"])
    tracking.setup("wsss-demo", root)
    summary = run_label(cfg)
    print(f"[demo] output folder: {out} (masks/, pseudo/, confidence/, cams/, manifest.parquet, run.json)")
    if summary.miou is not None:
        print(f"[demo] pseudo-mask mIoU: raw CAM {summary.miou_raw:.4f}, CAA-refined {summary.miou:.4f}")
    print(f"[demo] MLflow run {summary.run_id} in {tracking.tracking_uri(root)}")
    print(f"[demo] open the UI on that run:  .venv/bin/wsss ui   then {summary.run_url}")
    return main_exit_code(summary, cfg)

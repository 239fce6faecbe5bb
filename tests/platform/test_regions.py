"""The ``regions`` refiner through the platform: `wsss label` with ``refine: [caa, regions]`` on local and
S3 data, and a sweep over its thresholds and proposers that proposes regions once per proposer."""

import csv
import json
import re

import pytest
import yaml

from wsss_platform.datasets.demo import write_demo_dataset
from wsss_platform.label.job import run_label

from .test_label import check_outputs, label_config


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_label_with_caa_then_regions(where, tmp_path, ray_local, monkeypatch, request):
    """Every mask written and scored; with ``cache: full`` the masks are rebuilt from the cache by the
    core pipeline (proposals made again from the images) and give the same scores. The run's preview
    has a cell of the regions between the CAMs and the pseudo mask."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    write_demo_dataset(f"{root}/voc", "voc", 6, seed=15)
    cfg = label_config(f"{root}/voc", f"{root}/out", extra=(
        "refine=[caa, regions]", "regions.proposer=felzenszwalb", "regions.felzenszwalb.scale=50",
        *(("tracking.enabled=false",) if where == "s3" else ()), "cache=full"))
    summary = run_label(cfg)
    check_outputs(cfg, summary)
    if where == "local":
        settings = json.loads((tmp_path / "out" / "run.json").read_text())["settings"]
        assert settings["refine"] == ["caa", "regions"] and settings["regions"]["felzenszwalb"]["scale"] == 50
        import pyarrow.parquet as pq

        from wsss_platform import outputs

        shown = [r["image_id"] for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
                 if r["status"] == "done"][: cfg.tracking.preview_images]
        k_max = max(len(outputs.decode_cams((tmp_path / "out" / "cams" / f"{i}.npz").read_bytes())["labels"])
                    for i in shown)
        path = MlflowClient().download_artifacts(summary.run_id, "preview.png", str(tmp_path))
        with Image.open(path) as im:
            width = im.size[0]
        assert width == 160 * (1 + k_max + 1 + 2)  # image | CAMs | regions | pseudo mask | ground truth


@pytest.mark.slow
def test_a_sweep_over_inside_and_proposers_proposes_once_per_proposer(tmp_path, ray_local, monkeypatch):
    from wsss_platform.sweep.config import load_sweep_config
    from wsss_platform.sweep.job import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_demo_dataset(str(tmp_path / "voc"), "voc", 8, seed=16)
    doc = {"label": {"dataset": {"uri": str(tmp_path / "voc")}, "output": str(tmp_path / "labels"),
                     "model": {"name": "tiny", "pretrained": "none"}, "refine": ["caa", "regions"]},
           "objective": "miou", "subset": {"num_images": 4},
           "search_space": {"regions.proposer": {"choices": ["felzenszwalb", "slic"]},
                            "regions.inside": {"choices": [0.3, 0.5, 0.7]}},
           "tune": {"num_trials": 6, "max_concurrent_trials": 1, "seed": 1},
           "output": str(tmp_path / "sweep"), "tracking": {"enabled": False}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(doc))
    cfg, dims = load_sweep_config(tmp_path / "sweep.yaml")
    summary = run_sweep(cfg, dims)
    assert summary.num_trials == 6 and summary.errored == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "trials.csv").open()))
    proposers = {r["param:regions.proposer"] for r in rows}
    # the proposals of each proposer made once, on the 4 images, by the first trial that used it
    ran = sorted(int(r["refiner_images_run"]) for r in rows)
    assert ran == [0] * (6 - len(proposers)) + [4] * len(proposers)
    assert len(list((tmp_path / "sweep" / "cache").glob("refiner-regions-*.pt"))) == len(proposers)
    assert len({r["miou"] for r in rows}) > 1


@pytest.mark.parametrize(("extra", "needle"), [
    (["regions.proposer=sam"], "regions.sam.checkpoint: give the SAM weights"),
    (["regions.proposer=sam", "regions.sam.checkpoint=/nonexistent/sam_vit_b.pth"],
     "regions.sam.checkpoint: cannot read SAM weights from /nonexistent/sam_vit_b.pth"),
    (["regions.proposer=watershed"], "regions.proposer: unknown region proposer 'watershed'; known: felzenszwalb, sam, slic"),
    (["regions.inside=0"], "regions.inside: Input should be greater than 0"),
])
def test_bad_regions_settings_fail_before_any_work_naming_the_key(extra, needle):
    from wsss_platform.config import ConfigError, build_config
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.stages import check_stages

    pytest.importorskip("segment_anything")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_stages(build_config(LabelConfig, {}, ["model.name=tiny", "model.pretrained=none", "refine=[caa, regions]",
                                                    *extra]))


def test_a_proposer_s_own_settings_are_sweepable_keys(tmp_path):
    from wsss_platform.sweep.config import apply_params, load_sweep_config

    doc = {"label": {"model": {"name": "tiny", "pretrained": "none"}, "refine": ["caa", "regions"]},
           "search_space": {"regions.felzenszwalb.scale": {"low": 30.0, "high": 400.0, "log": True},
                            "regions.slic.n_segments": {"low": 50, "high": 400}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    cfg, dims = load_sweep_config(tmp_path / "s.yaml")
    assert [(d.key, d.kind) for d in dims] == [("regions.felzenszwalb.scale", "float"), ("regions.slic.n_segments", "int")]
    regions = apply_params(cfg.label.model_dump(mode="json"), {dims[0].name: 77.0, dims[1].name: 120})["regions"]
    assert regions["felzenszwalb"]["scale"] == 77.0 and regions["slic"]["n_segments"] == 120

"""End-to-end labeling on generated data: local and S3, VOC and COCO, bad input, MLflow."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from wsss_core.metrics import ConfusionMatrix
from wsss_core.types import CamOutput
from wsss_platform import outputs, storage
from wsss_platform.config import build_config
from wsss_platform.datasets import DatasetConfig, open_dataset
from wsss_platform.datasets.demo import write_demo_dataset
from wsss_platform.label.config import LabelConfig
from wsss_platform.label.job import main_exit_code, run_label
from wsss_platform.label.stages import build_masker

TINY = ["model.name=tiny", "model.pretrained=none", "refine=[caa]", "compute.batch_size=4", "compute.loader_batch_size=4"]


def label_config(data: str, out: str, layout: str = "voc", extra: tuple[str, ...] = ()) -> LabelConfig:
    return build_config(LabelConfig, {}, [f"dataset.uri={data}", f"dataset.layout={layout}", f"output={out}",
                                          "tracking.preview_images=2", *TINY, *extra])


def check_outputs(cfg: LabelConfig, summary) -> None:
    """Every image: exactly one palette PNG of its own size and a CAM cache; one manifest row."""
    ds = open_dataset(cfg.dataset)
    assert summary.total == len(ds.ids) and summary.done == len(ds.ids) and summary.failed == 0
    masks = storage.list_names(storage.join(cfg.output, "masks"))
    assert sorted(masks) == sorted(f"{i}.png" for i in ds.ids)
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(cfg.output, "manifest.parquet"))))
    assert sorted(manifest.column("image_id").to_pylist()) == sorted(ds.ids)
    assert set(manifest.column("status").to_pylist()) == {"done"}
    num_labels = ds.classes.num_classes + 1
    cm_raw, cm, cm_written = (ConfusionMatrix(num_labels) for _ in range(3))
    for image_id in ds.ids:
        row = ds.load(image_id)
        with Image.open(io.BytesIO(storage.read_bytes(outputs.mask_uri(cfg.output, image_id)))) as im:
            assert im.mode == "P" and im.size == (row.image.shape[1], row.image.shape[0])
            written = np.asarray(im)
        assert set(np.unique(written)) <= {0, 255, *row.labels}
        # the uncut pseudo mask and the confidence give back the written mask for this mu (any mu, later)
        with Image.open(io.BytesIO(storage.read_bytes(outputs.pseudo_uri(cfg.output, image_id)))) as im:
            pseudo = np.asarray(im)
        cm_written.update(pseudo, row.mask)
        conf = outputs.decode_confidence_png(storage.read_bytes(outputs.confidence_uri(cfg.output, image_id)))
        assert set(np.unique(pseudo)) <= {0, *row.labels} and conf.shape == pseudo.shape and conf.min() >= 0.5
        clear = np.abs(conf - cfg.mask.mu) > 1 / 255  # away from the rounding of the 8-bit confidence
        assert np.array_equal(np.where(conf < cfg.mask.mu, 255, pseudo)[clear], written[clear])
        if cfg.cache == "none":
            assert not storage.exists(outputs.cams_uri(cfg.output, image_id))
            continue
        cache = outputs.decode_cams(storage.read_bytes(outputs.cams_uri(cfg.output, image_id)))
        assert cache["cams"].dtype == np.float16 and list(cache["labels"]) == row.labels
        aux = outputs.aux_of(cache)
        if cfg.cache == "cams":  # lean: no attention
            assert not aux
            continue
        n = cache["cams"].shape[1] * cache["cams"].shape[2]
        if "caa" in cfg.refine:  # full: what the refiners read, and nothing they do not
            assert set(aux) == {f"attn/{cfg.caa.attn_layers}"} and aux[f"attn/{cfg.caa.attn_layers}"].shape == (n, n)
        else:
            assert not aux
        # The reported scores equal an independent re-scoring from the cached CAMs.
        out = CamOutput(row.labels, torch.from_numpy(cache["cams"].astype(np.float32)), torch.from_numpy(cache["class_scores"]),
                        {k: torch.from_numpy(v.astype(np.float32)) for k, v in aux.items()})
        res = build_masker(cfg)([out], [tuple(cache["size"])], [row.image])[0]
        cm_raw.update(res.mask_raw, row.mask)
        cm.update(res.mask, row.mask)
    assert summary.miou == pytest.approx(cm_written.miou(), abs=1e-9)  # the score is the written masks'
    if cfg.cache != "full":
        return
    assert summary.miou_raw == pytest.approx(cm_raw.miou(), abs=0.01)
    assert summary.miou == pytest.approx(cm.miou(), abs=0.01)


def test_label_voc_local_with_mlflow_server(tmp_path, ray_local, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_demo_dataset(str(tmp_path / "voc"), "voc", 10, seed=11)
    cfg = label_config(str(tmp_path / "voc"), str(tmp_path / "out"), extra=("cache=full",))
    summary = run_label(cfg)
    check_outputs(cfg, summary)
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["config"]["model"]["name"] == "tiny" and run_json["classes"]["classes"][0] == "circle"

    client = MlflowClient(mlflow_server)
    run = client.get_run(summary.run_id)
    assert run.data.params["model.name"] == "tiny" and run.data.params["caa.t"] == "2"
    assert run.data.params["dataset.uri"] == str(tmp_path / "voc")
    m = run.data.metrics
    assert m["images_done"] == 8 and m["images_failed"] == 0 and m["images_per_s"] > 0
    assert m["miou"] == pytest.approx(summary.miou) and m["miou_raw"] == pytest.approx(summary.miou_raw)
    assert "iou/background" in m and "iou_raw/background" in m
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run.json", "manifest.parquet", "preview.png"} <= artifacts
    preview = client.download_artifacts(run.info.run_id, "preview.png", str(tmp_path))
    # Two titled rows (160 px cells + 2 x 16 px of titles); columns: image, one CAM per present class
    # (as many as the image with most classes), pseudo mask, ground truth.
    shown = [r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist() if r["status"] == "done"][:2]
    with Image.open(preview) as im:
        assert im.size == ((3 + max(len(r["labels"]) for r in shown)) * 160, 2 * (160 + 32))


def test_label_coco_local(tmp_path, ray_local, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_demo_dataset(str(tmp_path / "coco"), "coco", 10, seed=12)
    # separate loader actors (the GPU default; CPU-only clusters load inside the labelers)
    cfg = label_config(str(tmp_path / "coco"), str(tmp_path / "out"), "coco",
                       ("tracking.enabled=false", "compute.loader_actors=2", "cache=none"))
    summary = run_label(cfg)
    check_outputs(cfg, summary)
    mapping = json.loads((tmp_path / "out" / "run.json").read_text())["classes"]["category_id_to_label"]
    assert mapping["5"] == 4


@pytest.mark.parametrize("layout", ["voc", pytest.param("coco", marks=pytest.mark.slow)])
def test_label_s3(s3_bucket, ray_local, tmp_path, monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_demo_dataset(f"{s3_bucket}/{layout}", layout, 7, seed=13)
    cfg = label_config(f"{s3_bucket}/{layout}", f"{s3_bucket}/out-{layout}", layout)
    summary = run_label(cfg)
    check_outputs(cfg, summary)
    assert storage.exists(f"{s3_bucket}/out-{layout}/run.json")


def test_rerun_skips_complete_images_and_overwrite_redoes_them(tmp_path, ray_local, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_demo_dataset(str(tmp_path / "voc"), "voc", 8, seed=14)
    cfg = label_config(str(tmp_path / "voc"), str(tmp_path / "out"), extra=("tracking.enabled=false",))
    first = run_label(cfg)
    again = run_label(cfg)
    assert (again.skipped, again.processed, again.done) == (first.total, 0, first.total)
    assert again.miou == pytest.approx(first.miou)  # scores cover the whole split on a resume
    redo = run_label(cfg.model_copy(update={"overwrite": True}))
    assert (redo.skipped, redo.processed, redo.done) == (0, first.total, first.total)


def test_corrupt_image_and_unknown_class_fail_clearly(tmp_path, ray_local, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    splits = write_demo_dataset(str(tmp_path / "voc"), "voc", 10, seed=15)
    bad_img, bad_cls = splits["train"][0], splits["train"][1]
    (tmp_path / "voc" / "JPEGImages" / f"{bad_img}.jpg").write_bytes(b"not a jpeg at all")
    xml = tmp_path / "voc" / "Annotations" / f"{bad_cls}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>unicorn", 1))
    cfg = label_config(str(tmp_path / "voc"), str(tmp_path / "out"), extra=("tracking.enabled=false",))
    summary = run_label(cfg)
    assert (summary.done, summary.failed) == (6, 2)
    errors = dict(summary.failures)
    assert f"JPEGImages/{bad_img}.jpg" in errors[bad_img] and "cannot decode image" in errors[bad_img]
    assert f"Annotations/{bad_cls}.xml" in errors[bad_cls] and "unknown class name 'unicorn" in errors[bad_cls]
    assert not (tmp_path / "out" / "masks" / f"{bad_img}.png").exists()
    assert main_exit_code(summary, cfg) == 1
    assert "above max_failed_fraction=0.0" in capsys.readouterr().err
    assert main_exit_code(summary, cfg.model_copy(update={"max_failed_fraction": 0.25})) == 0
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(manifest) == 8 and sum(r["status"] == "failed" for r in manifest) == 2


def test_missing_model_file_fails_before_any_work(tmp_path):
    from wsss_platform.config import ConfigError

    write_demo_dataset(str(tmp_path / "voc"), "voc", 3, seed=16)
    cfg = label_config(str(tmp_path / "voc"), str(tmp_path / "out"), extra=(f"model.pretrained={tmp_path}/nope.safetensors",))
    with pytest.raises(ConfigError, match=r"model\.pretrained: file not found"):
        run_label(cfg)
    assert not (tmp_path / "out").exists()


def test_datasetconfig_rejects_unknown_layout():
    from wsss_platform.config import ConfigError

    with pytest.raises(ConfigError, match=r"dataset\.layout"):
        build_config(LabelConfig, {}, ["dataset.layout=kitti"])
    assert DatasetConfig().layout == "voc"


def test_label_with_gradcam_caa_and_crf(tmp_path, ray_local, monkeypatch):
    """A second CAM source through the same job: GradCAM on CLIP, refined by CAA then the CRF."""
    pytest.importorskip("pydensecrf.densecrf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_demo_dataset(str(tmp_path / "voc"), "voc", 6, seed=13)
    cfg = label_config(str(tmp_path / "voc"), str(tmp_path / "out"),
                       extra=("cam_source=gradcam", "refine=[caa, crf]", "tracking.enabled=false", "cache=full"))
    summary = run_label(cfg)
    check_outputs(cfg, summary)
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["settings"]["cam_source"] == "gradcam" and run_json["settings"]["refine"] == ["caa", "crf"]
    assert run_json["settings"]["crf"]["iterations"] == 10


def test_label_with_caa_then_par(tmp_path, ray_local, monkeypatch):
    """ToCo's PAR as a refiner of CLIP-ES's scores, its settings from the par: section."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_demo_dataset(str(tmp_path / "voc"), "voc", 6, seed=14)
    cfg = label_config(str(tmp_path / "voc"), str(tmp_path / "out"),
                       extra=("refine=[caa, par]", "par.iterations=5", "par.dilations=[1, 2, 4]",
                              "tracking.enabled=false", "cache=none"))
    summary = run_label(cfg)
    check_outputs(cfg, summary)
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["settings"]["refine"] == ["caa", "par"]
    assert run_json["settings"]["par"] == {"dilations": [1, 2, 4], "iterations": 5, "w1": 0.3, "w2": 0.01}

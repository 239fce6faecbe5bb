"""`wsss export` / `wsss import`: pseudo masks to annotation tools and back, decoded with the tools' own
libraries (label-studio-sdk's brush RLE, pycocotools, PIL), ordered by doubt, and a real Label Studio."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from wsss_platform import outputs, storage
from wsss_platform.datasets.base import decode_mask

pytest.importorskip("label_studio_sdk", reason="label-studio-sdk is not installed (the dev extra has it)")


@pytest.fixture(scope="module")
def reviewable(tmp_path_factory, ray_local):
    """An 8-image demo VOC split labelled with MLflow tracking on; one image's JPEG is damaged (it fails)."""
    from wsss_platform.config import build_config
    from wsss_platform.datasets.demo import write_demo_dataset
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.job import run_label

    root = tmp_path_factory.mktemp("handoff")
    write_demo_dataset(str(root / "voc"), "voc", 10, seed=7)
    ids = (root / "voc" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (root / "voc" / "JPEGImages" / f"{ids[-1]}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    summary = run_label(build_config(LabelConfig, {}, [
        f"dataset.uri={root / 'voc'}", f"output={root / 'labels'}", "model.name=tiny", "model.pretrained=none",
        "refine=[caa]", "cache=none", "max_failed_fraction=0.5", "tracking.experiment=handoff"]), log=lambda s: None)
    assert summary.failed == 1 and summary.run_id
    yield root, ids, summary.run_id
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _pseudo(root: Path, image_id: str) -> np.ndarray:
    return decode_mask((root / "labels" / "pseudo" / f"{image_id}.png").read_bytes(), image_id)


def _conf(root: Path, image_id: str) -> np.ndarray:
    return outputs.decode_confidence_png((root / "labels" / "confidence" / f"{image_id}.png").read_bytes())


def _export(root: Path, fmt: str, out: str, *args: str) -> int:
    from wsss_platform.cli import main

    return main(["export", "--from", str(root / "labels"), "--format", fmt, "--output", out, *args])


def test_every_format_gives_back_every_mask_exactly_with_the_run_s_classes(reviewable, tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from pycocotools import mask as mask_utils

    root, ids, _ = reviewable
    done, failed = ids[:-1], ids[-1]
    names = json.loads((root / "labels" / "run.json").read_text())["classes"]["classes"]
    for fmt in ("label-studio", "cvat", "coco"):
        assert _export(root, fmt, str(tmp_path / fmt)) == 0
    # Label Studio: one brushlabels result per present class, in its RLE; background is what no brush covers
    tasks = json.loads((tmp_path / "label-studio" / "tasks.json").read_text())
    assert sorted(t["data"]["image_id"] for t in tasks) == sorted(done)
    for t in tasks:
        truth, pred = _pseudo(root, t["data"]["image_id"]), t["predictions"][0]
        got = np.zeros_like(truth)
        for r in pred["result"]:
            layer = decode_rle(r["value"]["rle"]).reshape(r["original_height"], r["original_width"], 4)[:, :, 3]
            got[layer > 127] = names.index(r["value"]["brushlabels"][0]) + 1
        assert np.array_equal(got, truth) and pred["model_version"] and 0 <= pred["score"] <= 1
    config = (tmp_path / "label-studio" / "label_config.xml").read_text()
    assert all(f'<Label value="{n}"' in config for n in names)
    # CVAT: class PNGs in labelmap.txt's colours
    with zipfile.ZipFile(tmp_path / "cvat" / "cvat.zip") as z:
        colours = {tuple(int(v) for v in line.split(":")[1].split(",")): line.split(":")[0]
                   for line in z.read("labelmap.txt").decode().splitlines()[1:]}
        assert sorted(colours.values()) == sorted(["background", *names])
        assert sorted(z.read("ImageSets/Segmentation/default.txt").decode().split()) == sorted(done)
        label = {c: ["background", *names].index(n) for c, n in colours.items()}
        for image_id in done:
            rgb = np.asarray(Image.open(io.BytesIO(z.read(f"SegmentationClass/{image_id}.png"))).convert("RGB"))
            got = np.array([label[tuple(int(v) for v in px)] for px in rgb.reshape(-1, 3)]).reshape(rgb.shape[:2])
            assert np.array_equal(got, _pseudo(root, image_id))
    # COCO results: one entry per image and class, pycocotools RLE, the class's mean confidence as score
    results = json.loads((tmp_path / "coco" / "results.json").read_text())
    cats = {c["id"]: c["name"] for c in json.loads((tmp_path / "coco" / "categories.json").read_text())}
    assert list(cats.values()) == names
    for image_id in done:
        truth, conf = _pseudo(root, image_id), _conf(root, image_id)
        mine = [r for r in results if r["image_id"] == image_id]
        assert sorted(names.index(cats[r["category_id"]]) + 1 for r in mine) == [k for k in np.unique(truth) if k]
        for r in mine:
            on = mask_utils.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()})
            k = names.index(cats[r["category_id"]]) + 1
            assert np.array_equal(on.astype(bool), truth == k)
            assert r["score"] == pytest.approx(conf[truth == k].mean(), abs=1e-4)
    # the failed image is left out of each and listed
    for fmt in ("label-studio", "cvat", "coco"):
        assert json.loads((tmp_path / fmt / "export.json").read_text())["left_out_failed"] == [failed]


def test_the_review_order_is_the_doubt_formula_most_doubtful_first_and_on_the_mlflow_run(reviewable, tmp_path):
    from mlflow.tracking import MlflowClient

    root, ids, run_id = reviewable
    assert _export(root, "label-studio", str(tmp_path / "top3"), "--review", "3", "--against",
                   str(root / "labels")) == 0
    table = pq.read_table(tmp_path / "top3" / "review.parquet").to_pylist()
    mu = json.loads((root / "labels" / "run.json").read_text())["config"]["mask"]["mu"]
    for row in table:  # the formula of wsss_core.review, from the PNGs
        mask, conf = _pseudo(root, row["image_id"]), _conf(root, row["image_id"])
        low, fg = (conf < mu).mean(), conf[mask > 0].mean() if (mask > 0).any() else 1.0
        assert row["low_confidence"] == pytest.approx(low, abs=1e-6)
        assert row["fg_confidence"] == pytest.approx(fg, abs=1e-6)
        assert row["disagreement"] == 0.0  # against itself
        assert row["doubt"] == pytest.approx((low + 1 - fg + 0) / 3, abs=1e-6)
    assert [r["rank"] for r in table] == list(range(1, 8)) and len(table) == 7
    assert [r["doubt"] for r in table] == sorted((r["doubt"] for r in table), reverse=True)
    tasks = json.loads((tmp_path / "top3" / "tasks.json").read_text())
    assert [t["data"]["image_id"] for t in tasks] == [r["image_id"] for r in table[:3]]
    # the labeling run got the table, all images in order
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    names = [a.path for a in client.list_artifacts(run_id) if a.path.startswith("review-")]
    assert names
    logged = json.loads(Path(client.download_artifacts(run_id, names[-1], str(tmp_path))).read_text())
    col = logged["columns"].index("image_id")
    assert [r[col] for r in logged["data"]] == [r["image_id"] for r in table]
    # --order id: the same rows by id
    assert _export(root, "coco", str(tmp_path / "by-id"), "--order", "id") == 0
    assert [r["image_id"] for r in pq.read_table(tmp_path / "by-id" / "review.parquet").to_pylist()] == sorted(ids[:-1])


def _ls_export(tasks: list[dict], changed: dict[str, np.ndarray], names: list[str]) -> list[dict]:
    """What Label Studio's JSON export holds after people annotated ``changed`` (the other tasks: none)."""
    from label_studio_sdk.converter.brush import mask2rle

    out = []
    for i, t in enumerate(tasks):
        if t["data"]["image_id"] not in changed:
            continue
        mask = changed[t["data"]["image_id"]]
        result = [{"from_name": "label", "to_name": "image", "type": "brushlabels", "original_height": mask.shape[0],
                   "original_width": mask.shape[1], "value": {"format": "rle", "brushlabels": [names[k - 1]],
                                                              "rle": mask2rle(((mask == k) * 255).astype(np.uint8))}}
                  for k in np.unique(mask) if k]
        out.append({"id": i, "data": t["data"], "annotations": [{"id": 1, "result": result, "was_cancelled": False}]})
    return out


def _check_import(root: Path, ids: list[str], out: Path, changed: dict[str, np.ndarray]) -> None:
    """Only the changed images differ from the labeling: their masks are the people's at full confidence."""
    from wsss_platform.config import build_config
    from wsss_platform.train.config import TrainConfig
    from wsss_platform.train.data import check_pseudo_masks

    names = json.loads((root / "labels" / "run.json").read_text())["classes"]["classes"]
    cfg = build_config(TrainConfig, {}, [f"dataset.uri={root / 'voc'}", f"train.pseudo_masks={out}"])
    check_pseudo_masks(cfg, ids[:-1], names)  # what `wsss train segmenter` checks before it starts
    for image_id in ids[:-1]:
        got = decode_mask((out / "pseudo" / f"{image_id}.png").read_bytes(), image_id)
        conf = outputs.decode_confidence_png((out / "confidence" / f"{image_id}.png").read_bytes())
        cut = decode_mask((out / "masks" / f"{image_id}.png").read_bytes(), image_id)
        if image_id in changed:
            assert np.array_equal(got, changed[image_id]) and (conf == 1).all() and np.array_equal(cut, got)
        else:
            assert np.array_equal(got, _pseudo(root, image_id)) and np.array_equal(conf, _conf(root, image_id))
            assert (out / "masks" / f"{image_id}.png").read_bytes() == (root / "labels" / "masks" / f"{image_id}.png").read_bytes()


def _repaint(mask: np.ndarray, label: int) -> np.ndarray:
    out = mask.copy()
    out[: mask.shape[0] // 3, : mask.shape[1] // 3] = label
    return out


def test_import_from_label_studio_and_cvat_changes_only_the_corrected_images(reviewable, tmp_path, capsys):
    from wsss_platform.cli import main

    root, ids, _ = reviewable
    names = json.loads((root / "labels" / "run.json").read_text())["classes"]["classes"]
    assert _export(root, "label-studio", str(tmp_path / "ls")) == 0 and _export(root, "cvat", str(tmp_path / "cvat")) == 0
    one = ids[1]
    changed = {one: _repaint(_pseudo(root, one), 1)}
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    (tmp_path / "ls-export.json").write_text(json.dumps(_ls_export(tasks, changed, names)))
    assert main(["import", "--format", "label-studio", "--from", str(tmp_path / "ls-export.json"), "--pseudo",
                 str(root / "labels"), "--output", str(tmp_path / "from-ls")]) == 0
    _check_import(root, ids, tmp_path / "from-ls", changed)
    report = capsys.readouterr().out
    share = (changed[one] != _pseudo(root, one)).mean()
    assert f"people changed {share:.1%}" in report and "train.pseudo_masks=" in report
    info = json.loads((tmp_path / "from-ls" / "run.json").read_text())["imported"]
    assert info["corrected"] == [one] and info["iou"]["circle"] < 1
    # CVAT: every image of the zip was reviewed; one repainted in the labelmap's colours
    src = tmp_path / "cvat" / "cvat.zip"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(tmp_path / "task.zip", "w") as w:
        for name in z.namelist():
            data = z.read(name)
            if name == f"SegmentationClass/{one}.png":
                rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()
                rgb[: rgb.shape[0] // 3, : rgb.shape[1] // 3] = (128, 0, 0)  # circle's colour
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="PNG")
                data = buf.getvalue()
            w.writestr(name, data)
    assert main(["import", "--format", "cvat", "--from", str(tmp_path / "task.zip"), "--pseudo", str(root / "labels"),
                 "--dataset", str(root / "voc"), "--output", str(tmp_path / "from-cvat")]) == 0
    for image_id in ids[:-1]:  # all reviewed: full confidence, and only `one` differs from the pseudo masks
        got = decode_mask((tmp_path / "from-cvat" / "pseudo" / f"{image_id}.png").read_bytes(), image_id)
        assert np.array_equal(got, changed.get(image_id, _pseudo(root, image_id)))
        assert (outputs.decode_confidence_png((tmp_path / "from-cvat" / "confidence" / f"{image_id}.png").read_bytes()) == 1).all()


def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(reviewable, tmp_path, capsys):
    from wsss_platform.cli import main

    root, ids, _ = reviewable
    names = json.loads((root / "labels" / "run.json").read_text())["classes"]["classes"]

    def fails(argv: list[str], *needles: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), err

    fails(["export", "--from", str(root / "voc"), "--format", "cvat", "--output", str(tmp_path / "x")],
          str(root / "voc" / "run.json"), "not a finished `wsss label` or `wsss predict` output")
    assert not (tmp_path / "x").exists()
    assert _export(root, "label-studio", str(tmp_path / "ls")) == 0 and _export(root, "cvat", str(tmp_path / "cvat")) == 0
    fails(["export", "--from", str(root / "labels"), "--format", "cvat", "--output", str(tmp_path / "cvat")],
          str(tmp_path / "cvat" / "cvat.zip"), "--overwrite")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    pseudo = _pseudo(root, ids[0])
    bad = _ls_export(tasks, {ids[0]: pseudo}, names)
    bad[0]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["unicorn"]
    (tmp_path / "unknown.json").write_text(json.dumps(bad))
    imp = ["import", "--pseudo", str(root / "labels"), "--output", str(tmp_path / "out")]
    fails([*imp, "--format", "label-studio", "--from", str(tmp_path / "unknown.json")],
          str(tmp_path / "unknown.json"), "unknown label 'unicorn'")
    small = _ls_export(tasks, {ids[0]: pseudo[:-8]}, names)
    (tmp_path / "small.json").write_text(json.dumps(small))
    fails([*imp, "--format", "label-studio", "--from", str(tmp_path / "small.json")], str(tmp_path / "small.json"),
          f"image {ids[0]} is", f"in {root / 'labels'}")
    with zipfile.ZipFile(tmp_path / "cvat" / "cvat.zip") as z, zipfile.ZipFile(tmp_path / "nomap.zip", "w") as w:
        for name in z.namelist():
            if name != "labelmap.txt":
                w.writestr(name, z.read(name))
    fails([*imp, "--format", "cvat", "--from", str(tmp_path / "nomap.zip")], str(tmp_path / "nomap.zip"), "labelmap.txt")
    fails([*imp, "--format", "label-studio", "--from", str(tmp_path / "cvat" / "cvat.zip")],
          str(tmp_path / "cvat" / "cvat.zip"), "not JSON")
    assert not (tmp_path / "out").exists()


def test_export_and_import_on_s3(reviewable, s3_bucket, tmp_path):
    """The labeling output and the export on object storage (the dataset stays where it was labelled)."""
    from wsss_platform.cli import main

    root, ids, _ = reviewable
    src = f"{s3_bucket}/labels"
    fs, _ = storage.filesystem(src)
    fs.put(str(root / "labels"), src, recursive=True)
    assert main(["export", "--from", src, "--format", "cvat", "--output", f"{s3_bucket}/review", "--review", "2"]) == 0
    assert storage.exists(f"{s3_bucket}/review/cvat.zip") and storage.exists(f"{s3_bucket}/review/review.parquet")
    local = tmp_path / "task.zip"
    local.write_bytes(storage.read_bytes(f"{s3_bucket}/review/cvat.zip"))
    assert main(["import", "--format", "cvat", "--from", f"{s3_bucket}/review/cvat.zip", "--pseudo", src,
                 "--output", f"{s3_bucket}/reviewed"]) == 0
    with zipfile.ZipFile(local) as z:
        reviewed = [n.split("/")[1][:-4] for n in z.namelist() if n.startswith("SegmentationClass/")]
    assert len(reviewed) == 2
    for image_id in ids[:-1]:
        conf = outputs.decode_confidence_png(storage.read_bytes(outputs.confidence_uri(f"{s3_bucket}/reviewed", image_id)))
        assert np.array_equal(conf, np.ones_like(conf) if image_id in reviewed else _conf(root, image_id))


# --- a real Label Studio ---------------------------------------------------------------------------

LS_USER, LS_PASSWORD = "reviewer@example.com", "wsss-review-pass"


def _label_studio_bin() -> Path | None:
    """Label Studio pins its own Django stack, so it lives in a venv of its own (`make label-studio`)."""
    path = Path(os.environ.get("WSSS_LABEL_STUDIO", Path(__file__).parents[2] / ".venv-ls" / "bin" / "label-studio"))
    return path if path.exists() else None


@pytest.fixture(scope="module")
def label_studio(reviewable, tmp_path_factory):
    """`label-studio start` on 127.0.0.1 (sqlite in its own data dir, serving the dataset's folder), and an
    API session logged in as its user (its legacy tokens are off by default; the session is what its UI uses)."""
    import subprocess

    from tests.conftest import free_port

    exe = _label_studio_bin()
    if exe is None:
        pytest.skip("Label Studio is not installed (make label-studio; .ci/run does)")
    root, port = reviewable[0], free_port()
    data = tmp_path_factory.mktemp("label-studio")
    env = {**os.environ, "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT":
           str(root), "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false"}
    with open(data / "server.log", "w") as log:
        proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                                 "--data-dir", str(data / "data"), "--username", LS_USER, "--password", LS_PASSWORD],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
        try:
            yield _ls_session(f"http://127.0.0.1:{port}", proc, data / "server.log")
        finally:
            proc.terminate()
            proc.wait(30)


def _ls_session(base: str, proc, log: Path):
    import time

    import requests

    deadline = time.monotonic() + 240
    while True:
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    s = requests.Session()
    s.get(f"{base}/user/login/")
    s.post(f"{base}/user/login/", data={"email": LS_USER, "password": LS_PASSWORD,
                                        "csrfmiddlewaretoken": s.cookies["csrftoken"]},
           headers={"Referer": f"{base}/user/login/"}, allow_redirects=False)
    s.headers.update({"X-CSRFToken": s.cookies["csrftoken"], "Referer": f"{base}/"})
    assert s.get(f"{base}/api/projects").status_code == 200
    return base, s


def _screenshot_task(browser, base: str, project: int, task: int, classes: list[str], shot: Path) -> None:
    import time

    from selenium.webdriver.common.by import By

    browser.get(f"{base}/user/login/")
    if browser.find_elements(By.NAME, "email"):
        browser.find_element(By.NAME, "email").send_keys(LS_USER)
        browser.find_element(By.NAME, "password").send_keys(LS_PASSWORD)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        time.sleep(2)
    browser.get(f"{base}/projects/{project}/data?task={task}")
    deadline = time.monotonic() + 90
    while True:
        body = browser.find_element(By.TAG_NAME, "body").text
        # the prediction's regions are listed by class in the side panel once its masks are drawn
        if "Regions" in body and any(f"\n{c}\n" in f"\n{body}\n" for c in classes) and browser.find_elements(By.TAG_NAME, "canvas"):
            break
        assert time.monotonic() < deadline, body[:2000]
        time.sleep(1)
    time.sleep(2)
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))


@pytest.mark.slow
def test_a_real_label_studio_round_trip(reviewable, label_studio, browser, tmp_path):
    """Export -> a Label Studio project (its config, tasks with predictions, the images from a local storage)
    -> the task renders in its UI -> a person's annotation changes one mask -> its export -> `wsss import`."""
    from label_studio_sdk.converter.brush import mask2rle

    from wsss_platform.cli import main

    root, ids, _ = reviewable
    base, s = label_studio
    names = json.loads((root / "labels" / "run.json").read_text())["classes"]["classes"]
    assert _export(root, "label-studio", str(tmp_path / "ls"), "--image-url", "/data/local-files/?d=voc/{path}") == 0
    config = (tmp_path / "ls" / "label_config.xml").read_text()
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    r = s.post(f"{base}/api/projects", json={"title": "wsss review", "label_config": config})
    assert r.status_code == 201, r.text
    project = r.json()["id"]
    r = s.post(f"{base}/api/storages/localfiles", json={"project": project, "path": str(root / "voc"), "title": "voc",
                                                        "use_blob_urls": False})
    assert r.status_code == 201, r.text
    r = s.post(f"{base}/api/projects/{project}/import", json=tasks)
    assert r.status_code == 201 and r.json()["prediction_count"] == len(tasks) == len(ids) - 1, r.text
    stored = s.get(f"{base}/api/tasks", params={"project": project, "page_size": 100}).json()["tasks"]
    by_image = {t["data"]["image_id"]: t for t in stored}
    for t in tasks:  # each prediction stored as exported
        preds = s.get(f"{base}/api/predictions", params={"task": by_image[t["data"]["image_id"]]["id"]}).json()
        assert len(preds) == 1 and [p["value"]["rle"] for p in preds[0]["result"]] == \
            [p["value"]["rle"] for p in t["predictions"][0]["result"]]
        assert s.get(base + t["data"]["image"]).headers["content-type"] == "image/jpeg"
    first = tasks[0]["data"]["image_id"]
    shown = [names[k - 1] for k in np.unique(_pseudo(root, first)) if k]
    _screenshot_task(browser, base, project, by_image[first]["id"], shown, Path(os.environ.get(
        "WSSS_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "label-studio-task.png")
    # a person repaints one image's top-left corner as circle and submits
    one = tasks[1]["data"]["image_id"]
    fixed = _repaint(_pseudo(root, one), 1)
    result = [{"id": f"r{k}", "from_name": "label", "to_name": "image", "type": "brushlabels",
               "original_width": fixed.shape[1], "original_height": fixed.shape[0], "image_rotation": 0,
               "value": {"format": "rle", "rle": mask2rle(((fixed == k) * 255).astype(np.uint8)),
                         "brushlabels": [names[k - 1]]}} for k in np.unique(fixed) if k]
    r = s.post(f"{base}/api/tasks/{by_image[one]['id']}/annotations", json={"result": result, "lead_time": 3.0})
    assert r.status_code == 201, r.text
    export = s.get(f"{base}/api/projects/{project}/export", params={"exportType": "JSON"})
    assert export.status_code == 200
    (tmp_path / "project-export.json").write_bytes(export.content)
    assert main(["import", "--format", "label-studio", "--from", str(tmp_path / "project-export.json"),
                 "--pseudo", str(root / "labels"), "--output", str(tmp_path / "reviewed")]) == 0
    _check_import(root, ids, tmp_path / "reviewed", {one: fixed})

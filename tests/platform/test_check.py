"""`wsss data check` catches each kind of problem and names the file."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from wsss_platform.cli import main
from wsss_platform.datasets import DatasetConfig
from wsss_platform.datasets.check import check_dataset
from wsss_platform.datasets.demo import write_demo_dataset


def broken_voc(root: Path) -> dict[str, str]:
    splits = write_demo_dataset(str(root), "voc", 10, seed=7)
    ids = splits["train"]
    (root / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="P").save(root / "SegmentationClass" / f"{ids[2]}.png")
    xml = root / "Annotations" / f"{ids[3]}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>unicorn", 1))
    (root / "Annotations" / f"{ids[4]}.xml").write_text("<annotation><filename>x.jpg</filename></annotation>")
    return {
        "missing image": f"JPEGImages/{ids[0]}.jpg",
        "corrupt image": f"JPEGImages/{ids[1]}.jpg",
        "mask/image size mismatch": f"SegmentationClass/{ids[2]}.png",
        "unknown class name": f"Annotations/{ids[3]}.xml",
        "empty label set": f"Annotations/{ids[4]}.xml",
    }


def test_voc_problems_each_named(tmp_path):
    expected = broken_voc(tmp_path)
    report = check_dataset(DatasetConfig(uri=str(tmp_path), layout="voc", split="train"))
    assert not report.ok
    text = [str(p) for p in report.problems]
    for what, file in expected.items():
        assert any(what in t and file in t for t in text), (what, file, text)
    assert len(report.problems) == len(expected)
    assert "unicorn" in "\n".join(text)


def test_coco_problems_each_named(tmp_path):
    write_demo_dataset(str(tmp_path), "coco", 10, seed=8)
    ann_path = tmp_path / "annotations" / "instances_train.json"
    doc = json.loads(ann_path.read_text())
    imgs = doc["images"]
    (tmp_path / "images" / imgs[0]["file_name"]).unlink()
    (tmp_path / "images" / imgs[1]["file_name"]).write_bytes(b"garbage")
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != imgs[2]["id"]]
    next(a for a in doc["annotations"] if a["image_id"] == imgs[3]["id"])["category_id"] = 999
    imgs[4]["width"] += 1
    ann_path.write_text(json.dumps(doc))
    report = check_dataset(DatasetConfig(uri=str(tmp_path), layout="coco", split="train"))
    text = "\n".join(str(p) for p in report.problems)
    assert f"images/{imgs[0]['file_name']}: missing image" in text
    assert f"images/{imgs[1]['file_name']}: corrupt image" in text
    assert f"image {imgs[2]['file_name'][:-4]} ({imgs[2]['file_name']}): empty label set" in text
    assert "unknown category ids [999]" in text
    assert f"images/{imgs[4]['file_name']}: image is" in text
    assert len(report.problems) == 5, text


def test_cli_exit_codes(tmp_path, capsys):
    good = tmp_path / "good"
    write_demo_dataset(str(good), "voc", 5, seed=9)
    assert main(["data", "check", str(good), "--layout", "voc", "--split", "train"]) == 0
    assert "no problems found" in capsys.readouterr().out
    bad = tmp_path / "bad"
    expected = broken_voc(bad)
    assert main(["data", "check", str(bad), "--layout", "voc"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS: 5" in out and all(f in out for f in expected.values())
    assert main(["data", "check", str(bad), "--layout", "voc", "--split", "nosuch"]) == 1
    assert "split file not found" in capsys.readouterr().out


def test_synthshapes_dev_passes(synthshapes):
    out = subprocess.run([sys.executable, "-m", "wsss_platform.cli", "data", "check", str(synthshapes / "dev"),
                          "--layout", "voc", "--split", "train"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "images: 200" in out.stdout and "crescent" in out.stdout

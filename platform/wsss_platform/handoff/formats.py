"""The annotation tools' formats, one class each: ``export`` builds every file in memory first (a bad
mask fails the export before anything is written); ``read`` gives back ``{image_id: mask}`` of what
people drew, label k meaning class ``classes[k - 1]``, 0 background.

- ``label-studio``: tasks JSON whose ``predictions`` hold one ``brushlabels`` result per class in
  Label Studio's own RLE (``label_studio_sdk.converter.brush``), and the labeling config XML.
- ``cvat``: CVAT's "Segmentation Mask 1.1" zip (``labelmap.txt``, ``SegmentationClass/*.png`` in the
  labelmap's colours, ``ImageSets/Segmentation/default.txt``).
- ``coco``: COCO results JSON (one entry per image and class, pycocotools RLE, ``score``) and the
  categories beside it (export only: COCO results are a model's output, not a correction).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image

from wsss_core.classes import voc_palette
from wsss_platform.handoff.source import MaskOutput

FROM_NAME, TO_NAME = "label", "image"
"""The names of the labeling config's BrushLabels and Image tags, which every result refers to."""


@dataclass
class Item:
    """One exported image: its mask (label indices, 0 background), the doubt that ranks it, its image URL."""

    image_id: str
    mask: np.ndarray
    confidence: np.ndarray
    doubt: float
    url: str


def present(mask: np.ndarray, classes: list[str], where: str) -> list[int]:
    """The foreground labels of ``mask``; a label with no class in run.json is refused, naming the file."""
    labels = [int(k) for k in np.unique(mask) if 0 < k < 255]
    if labels and labels[-1] > len(classes):
        raise ValueError(f"{where}: label {labels[-1]} but run.json lists {len(classes)} classes; the output is "
                         "damaged or mixed, label it again")
    return labels


def palette_colours(n: int) -> list[tuple[int, int, int]]:
    """VOC's colours of labels 0..n (background first)."""
    return [tuple(int(v) for v in c) for c in voc_palette()[: n + 1]]


class LabelStudio:
    name: ClassVar[str] = "label-studio"
    files: ClassVar[tuple[str, ...]] = ("tasks.json", "label_config.xml")

    @staticmethod
    def config_xml(classes: list[str]) -> str:
        colours = palette_colours(len(classes))[1:]
        labels = "\n".join(f'    <Label value={quoteattr(c)} background="#{r:02x}{g:02x}{b:02x}"/>'
                           for c, (r, g, b) in zip(classes, colours, strict=True))
        return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
                f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>\n')

    @staticmethod
    def result(mask: np.ndarray, label: int, classes: list[str], image_id: str) -> dict:
        from label_studio_sdk.converter.brush import mask2rle

        h, w = mask.shape
        return {"id": f"{image_id}-{label}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
                "original_width": w, "original_height": h, "image_rotation": 0,
                "value": {"format": "rle", "rle": mask2rle(((mask == label) * 255).astype(np.uint8)),
                          "brushlabels": [classes[label - 1]]}}

    def export(self, src: MaskOutput, items: Iterable[Item]) -> dict[str, bytes]:
        tasks = []
        for it in items:
            labels = present(it.mask, src.classes, f"{src.uri}/{it.image_id}")
            tasks.append({"data": {"image": it.url, "image_id": it.image_id, "doubt": round(it.doubt, 4)},
                          "predictions": [{"model_version": src.run_name, "score": round(1.0 - it.doubt, 4),
                                           "result": [self.result(it.mask, k, src.classes, it.image_id) for k in labels]}]})
        return {"tasks.json": json.dumps(tasks).encode(), "label_config.xml": self.config_xml(src.classes).encode()}

    def read(self, data: bytes, where: str, classes: list[str]) -> dict[str, np.ndarray]:
        """A Label Studio JSON export: each task's latest annotation that was not cancelled; tasks without one
        are not corrections and are left out."""
        try:
            tasks = json.loads(data)
        except ValueError as e:
            raise ValueError(f"--from: {where} is not JSON ({e}); export the project as JSON in Label Studio") from None
        if not isinstance(tasks, list):
            raise ValueError(f"--from: {where} is not a Label Studio JSON export (a list of tasks)")
        out = {}
        for task in tasks:
            done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
            image_id = task.get("data", {}).get("image_id")
            if not done:
                continue
            if not image_id:
                raise ValueError(f"--from: {where}: task {task.get('id')} has no data.image_id (not made by wsss export)")
            out[image_id] = self._mask(max(done, key=lambda a: a.get("updated_at") or a.get("id") or 0)["result"],
                                       classes, f"{where} (task {task.get('id')}, image {image_id})")
        return out

    @staticmethod
    def _mask(results: list[dict], classes: list[str], where: str) -> np.ndarray:
        from label_studio_sdk.converter.brush import decode_rle

        brushes = [r for r in results if r.get("type", "").lower() == "brushlabels" and r.get("value", {}).get("rle")]
        shape = next(((r["original_height"], r["original_width"]) for r in results if "original_height" in r), None)
        if shape is None:
            raise ValueError(f"--from: {where}: an annotation without any brush result or image size")
        mask = np.zeros(shape, dtype=np.uint8)
        for r in brushes:  # later strokes over earlier ones, as Label Studio draws them
            name = (r["value"].get("brushlabels") or [None])[0]
            if name not in classes:
                raise ValueError(f"--from: {where}: unknown label {name!r}; the classes are {', '.join(classes)}")
            if (r["original_height"], r["original_width"]) != shape:
                raise ValueError(f"--from: {where}: results of different image sizes")
            layer = decode_rle(r["value"]["rle"]).reshape(*shape, 4)[:, :, 3]
            mask[layer > 127] = classes.index(name) + 1
        return mask


class CVAT:
    name: ClassVar[str] = "cvat"
    files: ClassVar[tuple[str, ...]] = ("cvat.zip",)

    def export(self, src: MaskOutput, items: Iterable[Item]) -> dict[str, bytes]:
        colours = palette_colours(len(src.classes))
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: len(colours)] = colours
        buf, ids = io.BytesIO(), []
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for it in items:
                present(it.mask, src.classes, f"{src.uri}/{it.image_id}")
                png = io.BytesIO()
                Image.fromarray(lut[it.mask], mode="RGB").save(png, format="PNG")
                z.writestr(f"SegmentationClass/{it.image_id}.png", png.getvalue())
                ids.append(it.image_id)
            z.writestr("ImageSets/Segmentation/default.txt", "".join(f"{i}\n" for i in ids))
            z.writestr("labelmap.txt", "# label:color_rgb:parts:actions\n" + "".join(
                f"{n}:{r},{g},{b}::\n" for n, (r, g, b) in zip(["background", *src.classes], colours, strict=True)))
        return {"cvat.zip": buf.getvalue()}

    def read(self, data: bytes, where: str, classes: list[str]) -> dict[str, np.ndarray]:
        """Every image of the zip's SegmentationClass/ (CVAT exports each image of the task)."""
        try:
            z = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise ValueError(f"--from: {where} is not a zip; export the task as 'Segmentation mask 1.1' in CVAT") from None
        with z:
            if "labelmap.txt" not in z.namelist():
                raise ValueError(f"--from: {where} has no labelmap.txt (export the task as 'Segmentation mask 1.1'): "
                                 "without it the colours mean no class")
            colour_label = self._labelmap(z.read("labelmap.txt").decode(), classes, f"{where}:labelmap.txt")
            return {name.rsplit("/", 1)[1][:-4]: self._mask(z.read(name), colour_label, f"{where}:{name}")
                    for name in sorted(z.namelist()) if name.startswith("SegmentationClass/") and name.endswith(".png")}

    @staticmethod
    def _labelmap(text: str, classes: list[str], where: str) -> dict[tuple[int, int, int], int]:
        out = {}
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            name, rgb = line.split(":")[:2]
            if name != "background" and name not in classes:
                raise ValueError(f"--from: {where}: unknown label {name!r}; the classes are {', '.join(classes)}")
            out[tuple(int(v) for v in rgb.split(","))] = 0 if name == "background" else classes.index(name) + 1
        return out

    @staticmethod
    def _mask(png: bytes, colour_label: dict[tuple[int, int, int], int], where: str) -> np.ndarray:
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        mask = np.zeros(code.shape, dtype=np.uint8)
        seen = set(np.unique(code).tolist())
        for (r, g, b), label in colour_label.items():
            c = (r << 16) | (g << 8) | b
            mask[code == c] = label
            seen.discard(c)
        if seen:
            c = min(seen)
            raise ValueError(f"--from: {where}: colour {(c >> 16, (c >> 8) & 255, c & 255)} is in no labelmap.txt line")
        return mask


class COCOResults:
    name: ClassVar[str] = "coco"
    files: ClassVar[tuple[str, ...]] = ("results.json", "categories.json")

    def export(self, src: MaskOutput, items: Iterable[Item]) -> dict[str, bytes]:
        from pycocotools import mask as mask_utils

        to_cat = {int(v): int(k) for k, v in src.mapping.get("category_id_to_label", {}).items()}
        results = []
        for it in items:
            for k in present(it.mask, src.classes, f"{src.uri}/{it.image_id}"):
                on = it.mask == k
                rle = mask_utils.encode(np.asfortranarray(on.astype(np.uint8)))
                results.append({"image_id": int(it.image_id) if it.image_id.isdigit() else it.image_id,
                                "category_id": to_cat.get(k, k), "segmentation": {
                                    "size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                                "score": round(float(it.confidence[on].mean()), 4)})
        cats = [{"id": to_cat.get(i + 1, i + 1), "name": n} for i, n in enumerate(src.classes)]
        return {"results.json": json.dumps(results).encode(), "categories.json": json.dumps(cats, indent=1).encode()}


FORMATS: dict[str, Callable[[], LabelStudio | CVAT | COCOResults]] = {
    f.name: f for f in (LabelStudio, CVAT, COCOResults)}
IMPORTABLE = [n for n, f in FORMATS.items() if hasattr(f, "read")]

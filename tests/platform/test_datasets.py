"""Generated -> written in the real formats -> read back: same labels, same masks (local and S3)."""

import numpy as np
import pytest

from wsss_platform.datasets import COCODataset, DatasetConfig, VOCDataset, open_dataset
from wsss_platform.datasets.demo import generate, write_demo_dataset


def block_means(im):
    h, w = (s // 8 * 8 for s in im.shape[:2])
    return im[:h, :w].astype(float).reshape(h // 8, 8, w // 8, 8, 3).mean((1, 3))


def assert_round_trip(ds, scenes):
    for image_id in ds.ids:
        scene = scenes[image_id]
        row = ds.load(image_id)
        assert row.labels == scene.labels
        np.testing.assert_array_equal(row.mask, scene.mask)
        assert row.image.shape == scene.image.shape and row.image.dtype == np.uint8
        # JPEG is lossy on per-pixel noise textures: compare 8x8 block means.
        diff = np.abs(block_means(row.image) - block_means(scene.image)).mean()
        assert diff < 6  # a different scene differs by ~50


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_round_trip_local(tmp_path, layout):
    splits = write_demo_dataset(str(tmp_path / layout), layout, 12, seed=3)
    scenes = dict(generate(12, 3))
    for split, ids in splits.items():
        ds = open_dataset(DatasetConfig(uri=str(tmp_path / layout), layout=layout, split=split))
        assert sorted(ds.ids) == sorted(ids)
        assert ds.classes.names[0] == "circle" and ds.classes.num_classes == 10
        assert_round_trip(ds, scenes)


def test_voc_labels_from_mask_agree_with_xml(tmp_path):
    write_demo_dataset(str(tmp_path), "voc", 6, seed=4)
    by_xml = VOCDataset(str(tmp_path), "train", labels_from="xml")
    by_mask = VOCDataset(str(tmp_path), "train", labels_from="mask")
    for i in by_xml.ids:
        assert by_xml.load(i).labels == by_mask.load(i).labels


def test_coco_category_mapping_is_recorded(tmp_path):
    write_demo_dataset(str(tmp_path), "coco", 5, seed=5)
    ds = COCODataset(str(tmp_path), "train")
    mapping = ds.class_mapping()["category_id_to_label"]
    assert sorted(mapping.values()) == list(range(1, 11))
    assert mapping["3"] == 3 and "4" not in mapping and mapping["5"] == 4  # ids have gaps, labels do not


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_round_trip_s3(s3_bucket, layout):
    uri = f"{s3_bucket}/data/{layout}"
    write_demo_dataset(uri, layout, 6, seed=6)
    scenes = dict(generate(6, 6))
    ds = open_dataset(DatasetConfig(uri=uri, layout=layout, split="train"))
    assert len(ds.ids) == 5
    assert_round_trip(ds, scenes)

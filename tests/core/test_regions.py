"""Region proposals and the merge of pseudo masks into them (SEPL's rule), against a direct loop."""

import numpy as np
import pytest
import torch

from wsss_core.masks import confidence
from wsss_core.refine.regions import RegionMerge, region_merge
from wsss_core.regions import SLIC, Felzenszwalb, pack_layers, unpack_layers
from wsss_core.registry import PROPOSERS, create_proposer


def merge_by_loop(probs: torch.Tensor, masks: torch.Tensor, inside: float, cover: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule written out region by region, pixel by pixel: (merged mask, its confidence)."""
    mask = probs.argmax(0)
    conf = confidence(probs[1:])
    out_mask, out_conf = mask.clone(), conf.clone()
    claims = []  # (joined?, mean score of its class, class, mean confidence) per region
    for r in masks:
        area = r.sum().item()
        best = None
        for k in range(1, probs.shape[0]):
            inter = (r & (mask == k)).sum().item()
            size_k = (mask == k).sum().item()
            if inter > 0 and (inter / area >= inside or inter / size_k >= cover):
                s = probs[k][r].mean().item()
                if best is None or s > best[0]:
                    best = (s, k)
        c = conf[r].mean().item()
        claims.append((True, best[0], best[1], c) if best else (False, probs[0][r].mean().item(), 0, c))
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            here = [claims[i] for i in range(len(masks)) if masks[i, y, x]]
            if here:
                _, _, k, c = max(here, key=lambda t: (t[0], t[1]))
                out_mask[y, x], out_conf[y, x] = k, c
    return out_mask, out_conf


@pytest.mark.parametrize(("inside", "cover"), [(0.5, 0.85), (0.3, 0.6), (0.9, 0.99)])
def test_the_merge_equals_the_rule_region_by_region(inside, cover):
    g = torch.Generator().manual_seed(0)
    h, w, k = 24, 30, 3
    probs = torch.rand(1 + k, h, w, generator=g)
    probs[2, 4:16, 6:20] += 0.8  # one class with a body that regions can cover
    probs /= probs.max()  # scores in [0, 1], as the refiners give them
    # overlapping regions: a partition of blocks, and larger boxes over it
    blocks = torch.zeros(h, w, dtype=torch.long)
    for i in range(4):
        for j in range(5):
            blocks[i * 6:(i + 1) * 6, j * 6:(j + 1) * 6] = i * 5 + j
    masks = [blocks == b for b in range(20)]
    for y0, x0, y1, x1 in [(2, 4, 18, 22), (0, 0, 10, 12), (12, 15, 24, 30)]:
        m = torch.zeros(h, w, dtype=torch.bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    masks = torch.stack(masks)
    layers = pack_layers(masks)
    assert layers.shape[0] >= 2 and torch.equal(unpack_layers(layers), masks)
    merged = region_merge(probs, layers, inside, cover)
    want_mask, want_conf = merge_by_loop(probs, masks, inside, cover)
    assert torch.equal(merged.max(0).indices, want_mask)
    torch.testing.assert_close(confidence(merged[1:]), want_conf, atol=1e-5, rtol=0)
    assert not torch.equal(want_mask, probs.argmax(0))  # the regions changed something


def test_pixels_in_no_region_keep_their_scores_and_a_region_of_one_class_takes_it():
    probs = torch.tensor([[[0.5, 0.5, 0.5, 0.5]], [[0.9, 0.8, 0.2, 0.1]]])  # [2, 1, 4]: class 1 on the left half
    layers = torch.tensor([[[0, 0, 0, -1]]], dtype=torch.int32)  # one region over 3 pixels, 2 of class 1
    out = region_merge(probs, layers, inside=0.5, cover=0.85)
    assert out.max(0).indices.tolist() == [[1, 1, 1, 0]]
    assert torch.equal(out[:, :, 3], probs[:, :, 3])
    want = confidence(probs[1:])[0, :3].mean()
    torch.testing.assert_close(confidence(out[1:])[0, :3], want.expand(3))


def test_superpixels_are_deterministic_partitions_and_registered():
    rng = np.random.default_rng(3)
    image = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    image[10:30, 20:50] = [200, 30, 30]
    assert {"felzenszwalb", "slic", "sam"} <= set(PROPOSERS.names())
    for proposer in (Felzenszwalb(), SLIC(n_segments=30), create_proposer("felzenszwalb", scale=300)):
        a, b = proposer.propose(image), proposer.propose(image)
        assert a.dtype == torch.bool and a.shape[1:] == (48, 64) and a.shape[0] > 1
        assert torch.equal(a, b)
        assert torch.equal(a.sum(0), torch.ones(48, 64, dtype=torch.long))  # every pixel in exactly one region
        assert pack_layers(a).shape[0] == 1
    assert create_proposer("felzenszwalb", scale=1000).propose(image).shape[0] < Felzenszwalb(scale=10).propose(image).shape[0]


def test_the_refiner_proposes_once_per_image_and_reuses_given_regions():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, 10:] = 255
    calls = []

    class Halves:
        def propose(self, im):
            calls.append(1)
            m = torch.zeros(2, 20, 20, dtype=torch.bool)
            m[0, :, :10], m[1, :, 10:] = True, True
            return m

    probs = torch.zeros(2, 20, 20)
    probs[0] = 0.5
    probs[1, :, 8:] = 0.9  # class 1 spills 2 columns over the edge
    ref = RegionMerge(Halves())
    aux = ref.image_aux([image])
    assert len(calls) == 1 and aux[0]["regions"].dtype == torch.int32
    out = ref([probs], aux, [image])[0]
    assert len(calls) == 1  # given regions: no proposal
    assert out.max(0).indices[:, :10].eq(0).all() and out.max(0).indices[:, 10:].eq(1).all()
    ref([probs], [{}], [image])
    assert len(calls) == 2
    with pytest.raises(ValueError, match="inside and cover"):
        RegionMerge(Halves(), inside=0)


@pytest.mark.slow
def test_sam_with_random_weights_proposes_masks_of_the_image_size():
    pytest.importorskip("segment_anything")
    from wsss_core.regions import SAM

    image = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    sam = SAM(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    masks = sam.propose(image)
    assert masks.dtype == torch.bool and masks.ndim == 3 and masks.shape[1:] == (60, 80) and masks.shape[0] > 0
    with pytest.raises(ValueError, match="unknown SAM model type"):
        SAM(model_type="vit_x")

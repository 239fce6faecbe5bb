"""The one pipeline: registries, pairing checks, the generic source × refiners stage, map helpers."""

from typing import ClassVar

import numpy as np
import pytest
import torch

from wsss_core.maps import group_by_size, pad, size_batches, upsample
from wsss_core.masks import background_score, cams_to_mask, confidence
from wsss_core.pipeline import LabelingPipeline, PseudoMasker
from wsss_core.refine import CAA
from wsss_core.registry import (
    CAM_SOURCES,
    REFINERS,
    check_pipeline,
    create_cam_source,
    create_refiner,
)
from wsss_core.types import CamOutput, CamSource, Refiner


class CheckerSource:
    """A CAM source without attention: each class's CAM is a fixed ramp (enough to drive the stage)."""

    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, grid: tuple[int, int] = (3, 4)) -> None:
        self.grid = grid

    def __call__(self, images, labels, aux=()):
        h, w = self.grid
        ramp = torch.linspace(0, 1, h * w).view(h, w)
        return [CamOutput(sorted(ls), torch.stack([ramp.roll(k, 1) for k in range(len(ls))]) if ls else torch.zeros(0, h, w),
                          torch.full((len(ls),), 0.5)) for ls in labels]


class Halve:
    """A probability refiner: halves the background, so the argmax moves towards the classes."""

    space: ClassVar[str] = "probs"
    needs: ClassVar[frozenset[str]] = frozenset()
    needs_image: ClassVar[bool] = False
    aux_keys = frozenset()

    def __call__(self, maps, aux, images=None):
        return [torch.cat([m[:1] / 2, m[1:]]) for m in maps]


@pytest.fixture()
def checker():
    CAM_SOURCES.register("test_checker")(CheckerSource)
    REFINERS.register("test_halve")(Halve)
    yield
    del CAM_SOURCES._items["test_checker"], REFINERS._items["test_halve"]


def test_registries_list_the_builtins_and_build_with_keywords():
    assert {"clip_es", "gradcam"} <= set(CAM_SOURCES.names()) and {"caa", "crf"} <= set(REFINERS.names())
    caa = create_refiner("caa", attn_layers=4, t=3)
    assert isinstance(caa, Refiner) and caa.t == 3 and caa.aux_keys == {"attn/4"}
    with pytest.raises(KeyError, match=r"unknown refiner 'cfr'; known: caa, crf"):
        create_refiner("cfr")
    with pytest.raises(ValueError, match="already registered"):
        REFINERS.register("caa")(CAA)


def test_impossible_pairings_are_refused_naming_both(checker):
    check_pipeline("clip_es", ["caa", "crf"])
    check_pipeline("test_checker", ["test_halve"])
    with pytest.raises(ValueError, match=r"refiner 'caa' needs attn .* CAM source 'test_checker' does not provide it"
                                         r".*sources that can feed 'caa': clip_es, gradcam"):
        check_pipeline("test_checker", ["caa"])
    with pytest.raises(ValueError, match=r"'caa' works on CAMs and must come before 'crf'"):
        check_pipeline("clip_es", ["crf", "caa"])
    with pytest.raises(ValueError, match="listed twice"):
        check_pipeline("clip_es", ["caa", "caa"])


def test_generic_stage_equals_the_formulas(checker):
    source = create_cam_source("test_checker", grid=(3, 4))
    assert isinstance(source, CamSource)
    images = [np.zeros((12, 16, 3), np.uint8), np.zeros((6, 8, 3), np.uint8), np.zeros((12, 16, 3), np.uint8)]
    labels = [[5, 2], [7], []]
    plain = LabelingPipeline(source, PseudoMasker(bg_rule="power", bg_value=2.0, mu=0.6))(images, labels)
    halved = LabelingPipeline(source, PseudoMasker([Halve()], bg_rule="power", bg_value=2.0, mu=0.6))(images, labels)
    for im, ls, p, h in zip(images, labels, plain, halved, strict=True):
        cams = upsample(source([im], [ls])[0].cams, im.shape[:2])
        assert p.labels == sorted(ls) and p.mask.shape == im.shape[:2]
        assert torch.equal(p.mask, cams_to_mask(cams, sorted(ls), bg_power=2.0)) and torch.equal(p.mask, p.mask_raw)
        torch.testing.assert_close(p.confidence, confidence(cams))
        assert torch.equal(p.mask_conf == 255, p.confidence < 0.6)
        bg = background_score(cams, bg_power=2.0) / 2  # the probs refiner ran after the background rule
        assert torch.equal(h.mask, cams_to_mask(cams, sorted(ls), background=bg))
    assert plain[2].mask.sum() == 0 and (plain[2].confidence == 1).all()
    assert (halved[0].mask > 0).sum() > (plain[0].mask > 0).sum()


def test_precomputed_background_is_the_same_argmax():
    cams = torch.rand(3, 5, 7)
    bg = background_score(cams, bg_threshold=0.4)
    assert torch.equal(cams_to_mask(cams, [1, 4, 9], bg_threshold=0.4), cams_to_mask(cams, [1, 4, 9], background=bg))
    with pytest.raises(ValueError, match="not both"):
        cams_to_mask(cams, [1, 4, 9], bg_threshold=0.4, background=bg)


def test_map_helpers():
    shapes = [(4, 6, 3), (8, 8, 3), (4, 6, 3), (4, 6, 3), (8, 8, 3)]
    assert group_by_size(shapes) == {(4, 6): [0, 2, 3], (8, 8): [1, 4]}
    assert list(size_batches(shapes, 2)) == [[0, 2], [3], [1, 4]]
    padded = pad([torch.ones(2, 3, 3), torch.ones(0, 3, 3), torch.ones(1, 3, 3)])
    assert padded.shape == (3, 2, 3, 3) and padded[1].sum() == 0 and padded[2, 1].sum() == 0
    assert upsample(torch.zeros(0, 3, 3), (6, 6)).shape == (0, 6, 6)
    assert confidence(torch.rand(2, 3, 5, 5)).shape == (2, 5, 5)


class FlatAttnSource:
    """Nearly flat CAMs (last-bit differences) and random attention: where rounding moves CAA's boxes."""

    provides: ClassVar[frozenset[str]] = frozenset({"attn"})

    def __call__(self, images, labels, aux=()):
        g = torch.Generator().manual_seed(0)
        out = []
        for ls in labels:
            cams = 0.4 + 2e-4 * torch.rand(len(ls), 6, 6, generator=g)
            attn = torch.softmax(4 * torch.randn(36, 36, generator=g), -1)
            out.append(CamOutput(sorted(ls), cams, torch.full((len(ls),), 0.5), {k: attn for k in aux}))
        return out


def test_masks_are_refined_from_the_values_kept_so_refining_them_again_gives_them_back():
    images, labels = [np.zeros((24, 24, 3), np.uint8)] * 3, [[1, 3], [2], [1, 2, 4]]
    masker = PseudoMasker([CAA(attn_layers=2)])
    kept = LabelingPipeline(FlatAttnSource(), masker, kept_dtype=torch.float16)(images, labels)
    plain = LabelingPipeline(FlatAttnSource(), masker)(images, labels)
    again = masker([CamOutput(r.labels, r.cams.half().float(), r.class_scores, {k: v.half().float() for k, v in r.aux.items()})
                    for r in kept], [(24, 24)] * 3)
    for k, a in zip(kept, again, strict=True):
        assert torch.equal(k.mask, a.mask) and torch.equal(k.refined, a.refined)
    # without rounding first, the float32 CAMs give other masks than the float16 ones a cache holds
    assert any(not torch.equal(p.mask, a.mask) for p, a in zip(plain, again, strict=True))

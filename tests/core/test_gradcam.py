"""Plain GradCAM on CLIP (the CLIP-ES paper's baseline): batched equals a per-class loop, and a
class's CAM ignores the other classes (no softmax competition)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_core.cams import ClipES, ClipGradCAM
from wsss_core.classes import VOC
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.prompts import build_prompts
from wsss_core.registry import create_cam_source

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from reference_clip_es import reference_cams


@pytest.fixture(scope="module")
def vit():
    return ClipViT(*create_clip("tiny", "none"))


def test_batched_gradcam_equals_per_class_loop(vit):
    source = create_cam_source("gradcam", clip=vit, prompts=build_prompts(VOC), batch_size=8)
    assert isinstance(source, ClipGradCAM)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)]
    labels = [[3, 8, 15], [2, 20]]
    fg, bg = source.text_features()
    for img, ls, out in zip(images, labels, source(images, labels), strict=True):
        ref, ref_scores, _ = reference_cams(vit, fg, bg, img, ls, softmax=False)
        torch.testing.assert_close(out.cams, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(out.scores, ref_scores, atol=1e-5, rtol=1e-4)


def test_no_competition_unlike_softmax_gradcam(vit):
    img = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    prompts = build_prompts(VOC)
    grad = ClipGradCAM(vit, prompts)
    alone, together = grad([img], [[3]])[0].cams[0], grad([img], [[3, 8]])[0].cams[0]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)  # Y_c does not see class 8
    no_bg = ClipGradCAM(vit, build_prompts(VOC, use_background=False))([img], [[3, 8]])[0].cams[0]
    torch.testing.assert_close(no_bg, together, atol=1e-5, rtol=0)  # nor the background prompts
    softmax = ClipES(vit, prompts)([img], [[3, 8]])[0].cams[0]
    assert (softmax - together).abs().max() > 1e-3

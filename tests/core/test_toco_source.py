"""ToCo as a CAM source (its CAMs, its head's masks, its backbone's attention) and the checkpoint round trip."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.cams import toco_cam
from wsss_core.classes import ClassSet
from wsss_core.models import create_network, network_from_state
from wsss_core.models.backbones import create_backbone
from wsss_core.registry import check_pipeline, create_cam_source

CLASSES = ClassSet(("circle", "square", "star"))


def _state(backbone: str = "open_clip:tiny") -> dict:
    torch.manual_seed(0)
    net = create_network("toco", "none", backbone=backbone, aux_layer=-3, proj_dim=16,
                         class_names=["background", *CLASSES.names])
    return {"model": net.state_dict(), "toco": net.spec}


def test_checkpoint_round_trip_rebuilds_the_same_network():
    state = _state()
    net, names = network_from_state(state, "toco")
    assert names == ["background", "circle", "square", "star"] and not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    with pytest.raises(ValueError, match="not a ToCo checkpoint"):
        network_from_state({"model": {}, "segmenter": {"class_names": names}}, "toco")


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "open_clip:tiny"])
def test_attention_is_the_blocks_softmax_averaged_over_heads_and_the_last_blocks(backbone):
    """Against each library's own attention weights: timm's unfused path, torch's MultiheadAttention."""
    torch.manual_seed(1)
    bb = create_backbone(backbone, None, out_indices=(-3, -1)).eval()
    x = torch.randn(2, 3, 48, 64)  # a 3×4 grid
    blocks = bb.attention_blocks()
    seen = {}
    inputs = {}
    if backbone.startswith("open_clip"):
        hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    else:
        for b in blocks:
            b.fused_attn = False
        hooks = [b.attn_drop.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.mean(1)))
                 for i, b in enumerate(blocks)]
    with torch.no_grad():
        bb.forward_with_cls(x)
        for h in hooks:
            h.remove()
        for i, y in inputs.items():  # torch's own head-averaged weights on the same inputs
            seen[i] = blocks[i](y, y, y, need_weights=True)[1]
    p = bb.num_prefix_tokens
    got = bb.attention(x, [1, 2, 99])
    assert set(got) == {1, 2, 99} and got[1].shape == (2, 12, 12)
    depth = len(blocks)
    for n, k in ((1, 1), (2, 2), (99, depth)):
        want = torch.stack([seen[i][:, p:, p:] for i in range(depth - k, depth)]).mean(0)
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-6)


def test_toco_source_gives_the_multiscale_cam_of_the_present_classes_on_the_token_grid():
    state = _state()
    src = create_cam_source("toco", checkpoint=state, classes=CLASSES, scales=(1.0, 0.5))
    net = src.net
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8),
              rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)]
    out = src(images, [[3, 1], [2], []], aux=["attn/2"])
    assert [o.labels for o in out] == [[1, 3], [2], []]
    assert out[0].cams.shape == (2, 4, 5) and out[1].cams.shape == (1, 3, 3) and out[2].cams.shape == (0, 4, 5)
    assert out[0].aux["attn/2"].shape == (20, 20) and out[1].aux["attn/2"].shape == (9, 9)
    # image 0 by hand: the normalised pixels (already a patch multiple), the CAM of toco_cam, classes 1 and 3
    pixels = net.normalize(torch.as_tensor(images[0])[None])
    with torch.no_grad():
        want = toco_cam(lambda p: net.cams(p)[0], pixels, (1.0, 0.5), flip=True, size=(4, 5))[0, [0, 2]]
        scores = net(pixels)["logits"].sigmoid()[0, [0, 2]]
        attn = net.backbone.attention(pixels, [2])[2][0]
    torch.testing.assert_close(out[0].cams, want)
    torch.testing.assert_close(out[0].scores, scores)
    torch.testing.assert_close(out[0].aux["attn/2"], attn)
    # an image off the patch grid is resized to the nearest multiple (40×50 -> 48×48: 3×3)
    assert float(out[1].cams.amax()) == pytest.approx(1.0, abs=1e-3)


def test_toco_seg_source_is_the_heads_softmax_over_background_and_present_classes():
    src = create_cam_source("toco_seg", checkpoint=_state(), classes=CLASSES)
    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = src([image], [[2, 3]])[0]
    net = src.net
    with torch.no_grad():
        x = net.normalize(torch.as_tensor(image)[None])
        seg = (net(x)["seg"] + net(x.flip(-1))["seg"].flip(-1)) / 2
        want = F.softmax(seg[0, [0, 2, 3]], dim=0)[1:]
    torch.testing.assert_close(out.cams, want)
    assert float(out.cams.sum(0).max()) < 1.0  # the background keeps its share


def test_toco_sources_check_the_classes_and_pair_with_every_refiner():
    with pytest.raises(ValueError, match=r"trained on classes \['circle', 'square', 'star'\], the dataset has \['a', 'b', 'c'\]"):
        create_cam_source("toco", checkpoint=_state(), classes=ClassSet(("a", "b", "c")))
    for refine in (["caa", "crf"], ["caa", "par"], ["par"], []):
        check_pipeline("toco", refine)
        check_pipeline("toco_seg", refine)
    with pytest.raises(ValueError, match="'caa' works on CAMs and must come before 'par'"):
        check_pipeline("toco", ["par", "caa"])

"""Shared backbones: one interface for timm CNNs, timm ViTs and open_clip towers, at odd sizes."""

import pytest
import torch

from wsss_core.models.backbones import create_backbone
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.models.grid import resize_pos_embed


@pytest.mark.parametrize("name, kwargs, channels, grid", [
    ("resnet18", {"output_stride": 8}, [512], (13, 17)),
    ("resnet18", {"output_stride": 16, "out_indices": (-2, -1)}, [256, 512], (7, 9)),
    ("vit_tiny_patch16_224", {"out_indices": (-3, -1)}, [192, 192], (7, 9)),
    ("open_clip:tiny", {"out_indices": (1, -1)}, [192, 192], (7, 9)),
])
def test_feature_maps_at_odd_sizes(name, kwargs, channels, grid):
    bb = create_backbone(name, "none", **kwargs)
    feats = bb(torch.randn(2, 3, 97, 131))
    assert bb.channels == channels and [f.shape[1] for f in feats] == channels
    assert tuple(feats[-1].shape[-2:]) == grid and len(bb.mean) == len(bb.std) == 3
    feats[-1].mean().backward()  # trainable end to end
    assert any(p.grad is not None for p in bb.parameters())


def test_open_clip_tower_matches_clip_es_tokens_on_the_native_grid():
    bb = create_backbone("open_clip:tiny", "none").eval()
    vit = ClipViT(*create_clip("tiny", "none"))
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = bb(pixels)[-1]
        x = vit.embed(pixels)
        for block in vit.blocks:
            x = block(x)
    torch.testing.assert_close(tokens.flatten(2).transpose(1, 2), x[:, 1:], atol=1e-5, rtol=1e-4)


def test_resize_pos_embed():
    pos = torch.randn(1 + 14 * 14, 8)
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos
    grown = resize_pos_embed(pos, (14, 14), (5, 9))
    assert grown.shape == (1 + 45, 8) and torch.equal(grown[0], pos[0])
    # a constant embedding stays constant under bilinear resizing
    const = torch.ones(1 + 16, 4)
    torch.testing.assert_close(resize_pos_embed(const, (4, 4), (7, 3)), torch.ones(1 + 21, 4))


def test_weights_file_and_wrong_weights(tmp_path):
    a = create_backbone("resnet18", "none")
    sd = {f"{k}": v + 1 for k, v in a.model.state_dict().items() if v.is_floating_point()}
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    b = create_backbone("resnet18", str(tmp_path / "w.pt"))
    assert torch.equal(b.model.conv1.weight, sd["conv1.weight"])
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="weights do not fit resnet18"):
        create_backbone("resnet18", str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "open_clip:tiny"])
def test_every_parameter_takes_part(name):
    """DDP needs each parameter in the loss: nothing past the last returned block (norms, heads)."""
    bb = create_backbone(name, "none", out_indices=(1,) if "resnet" not in name else (-1,))
    sum(f.sum() for f in bb(torch.randn(1, 3, 64, 64))).backward()
    assert [n for n, p in bb.named_parameters() if p.grad is None] == []

"""Model loading paths and positional-embedding interpolation."""

import io
import json

import pytest
import torch
from safetensors.torch import save

from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.models.weights import model_config


def test_tiny_is_deterministic_and_config_json_with_weights_file(tmp_path):
    a, _ = create_clip("tiny", "none")
    b, _ = create_clip("tiny", None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    cfg = tmp_path / "custom.json"
    cfg.write_text(json.dumps(model_config("tiny")))
    sd = {k: v + 1 for k, v in a.state_dict().items()}
    weights = save(sd)
    (tmp_path / "w.safetensors").write_bytes(weights)
    torch.save(sd, tmp_path / "w.pt")
    for source in (str(tmp_path / "w.safetensors"), weights, io.BytesIO(weights), str(tmp_path / "w.pt")):
        m, tok = create_clip(str(cfg), source)
        assert torch.equal(m.visual.conv1.weight, sd["visual.conv1.weight"])
    assert tok(["a b"]).shape == (1, 32)


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        create_clip("ViT-Nope", "none")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        create_clip(str(tmp_path / "missing.json"), "none")
    (tmp_path / "bad.safetensors").write_bytes(save({"x": torch.zeros(1)}))
    with pytest.raises(ValueError, match="weights do not fit"):
        create_clip("tiny", str(tmp_path / "bad.safetensors"))


def test_positional_embedding_interpolation():
    model, tok = create_clip("tiny", "none")
    vit = ClipViT(model, tok)
    pe = model.visual.positional_embedding
    same = vit.positional_embedding(14, 14, pe.device, pe.dtype)
    assert torch.equal(same, pe)
    grown = vit.positional_embedding(7, 28, pe.device, pe.dtype)
    assert grown.shape == (1 + 7 * 28, pe.shape[1])
    assert torch.equal(grown[0], pe[0])  # CLS kept
    assert vit.grid_size(100, 150) == (6, 9) and vit.grid_size(7, 7) == (1, 1)

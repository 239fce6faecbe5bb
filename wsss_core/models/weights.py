"""Where a model's weights come from, in one place for every network of the project.

``pretrained`` is one of:
- ``none`` (or ``""``/None): random initialisation (tests, custom training from scratch);
- a library tag: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``) or, for timm,
  ``true``/``timm`` (the model's default pretrained weights through timm's own loader);
- a weights file: a path, raw bytes or a binary file object holding a ``.safetensors`` file, a
  torch pickle (``.pt``/``.pth``/``.bin``, optionally under ``state_dict``/``model``) or a
  TorchScript archive (OpenAI's released CLIP checkpoints). URIs on object storage (``s3://…``) are
  read into bytes by the platform, which owns storage access; this module never opens a URI.

Model configs: a ``name`` may be a path to an open_clip model-config JSON, or the name of one
packaged under ``wsss_core/models/configs/`` (``tiny``: a small random ViT for tests).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import IO, Any

import torch

WeightsSource = str | os.PathLike | bytes | IO[bytes] | None
CONFIG_DIR = Path(__file__).with_name("configs")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def is_random(pretrained: WeightsSource) -> bool:
    return pretrained is None or (isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none"))


def is_weights_file(pretrained: WeightsSource) -> bool:
    """Bytes, a file object, or a path to an existing file (a tag is none of these)."""
    if is_random(pretrained):
        return False
    if not isinstance(pretrained, str | os.PathLike):
        return True
    return os.path.isfile(pretrained)


def looks_like_path(value: str) -> bool:
    """A value meant as a file (so a missing one is an error, not an unknown tag)."""
    return os.sep in value or value.endswith((*WEIGHT_SUFFIXES, ".json"))


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict[str, Any] | None:
    """The open_clip config of a JSON path or a packaged config name; None for a library name."""
    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if name.endswith(".json") and not path.is_file():
        raise FileNotFoundError(f"model config JSON not found: {name}")
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def check_clip_name(name: str) -> None:
    """``name`` is an open_clip model, an open_clip model-config JSON path or a packaged config; else a
    ValueError that says which names are known."""
    try:
        if model_config(name) is not None:
            return
    except FileNotFoundError as e:
        raise ValueError(f"{e}; give the path of an open_clip model-config JSON") from None
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; use one of open_clip.list_models(), a config JSON "
                         f"path, or a packaged config ({', '.join(packaged_configs())})")


def read_bytes(source: str | os.PathLike | bytes | IO[bytes]) -> bytes:
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return f.read()
    return source if isinstance(source, bytes) else source.read()


def load_state_dict(source: str | os.PathLike | bytes | IO[bytes]) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, a torch pickle or a TorchScript archive ("module."
    prefixes of DDP checkpoints removed)."""
    data = read_bytes(source)
    if data[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        from safetensors.torch import load as load_safetensors

        sd = load_safetensors(data)
    else:
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            # OpenAI's released checkpoints are TorchScript archives.
            sd = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model: torch.nn.Module, source: str | os.PathLike | bytes | IO[bytes], what: str,
                 prefix: str = "") -> None:
    """Load a weights file into ``model`` (keys under ``prefix`` only, prefix removed); every key
    must fit, so the wrong file fails here naming a few keys, not later as garbage output."""
    sd = load_state_dict(source)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")

"""What a ``wsss train`` checkpoint holds, and loading a segmenter back from one (local or s3://).

``checkpoint.pt`` in each ``checkpoint_*`` folder: ``model`` (state dict), ``optimizer``,
``scheduler``, ``iteration``, and ``segmenter`` (backbone, head, output stride, class names): enough
to rebuild the network with no config at hand (``wsss predict``, the MLflow model, previews).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from wsss_platform import storage
from wsss_platform.storage import StorageOptions

FILE = "checkpoint.pt"


USES = {"toco": "a toco network labels with `wsss label cam_source=toco model.checkpoint=URI`",
        "affinitynet": "an affinitynet refines with `wsss label 'refine=[random_walk]' random_walk.checkpoint=URI`"}
"""What another recipe's network is for, by the name its spec is stored under."""


def segmenter_spec(model_cfg: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    return {"backbone": model_cfg["backbone"], "head": model_cfg["head"], "output_stride": model_cfg["output_stride"],
            "class_names": list(class_names)}


def resolve(uri: str, options: StorageOptions | None = None) -> str:
    """A checkpoint folder as given, or a training output's (``train.json`` beside ``train/``) latest."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, FILE), options):
        return uri
    root = storage.join(uri, "train")
    folders = sorted(n for n in storage.list_names(root, options)
                     if n.startswith("checkpoint_") and storage.exists(storage.join(root, n, FILE), options))
    if not folders:
        raise ValueError(f"--checkpoint: no {FILE} in {uri} nor a checkpoint_* folder in {root}; give a checkpoint "
                         "folder or the output of `wsss train`")
    return storage.join(root, folders[-1])  # Train names them by time


class DamagedCheckpoint(ValueError):
    """A checkpoint file that does not load: named, with the fix; a retry would meet it again."""


def decode(data: bytes, name: str) -> dict[str, Any]:
    """A ``checkpoint.pt``'s bytes -> its contents on CPU, or :class:`DamagedCheckpoint` naming ``name``."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, zip errors, … for a bad file
        raise DamagedCheckpoint(f"{name} does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                "it is truncated or not a `wsss train` checkpoint: give another checkpoint folder, or "
                                "delete this one to continue from the one before") from None


def load_state(uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """The checkpoint's contents, on CPU."""
    path = storage.join(uri, FILE)
    return decode(storage.read_bytes(path, options), path)


def spec_of(state: dict[str, Any], uri: str) -> dict[str, Any]:
    """The checkpoint's segmenter spec (see :func:`segmenter_spec`), or an error naming the file."""
    spec = state.get("segmenter")
    other = [k for k, v in state.items() if k != "segmenter" and isinstance(v, dict) and "class_names" in v]
    if spec is None and other:  # another recipe's network (its spec is stored under the network's name)
        raise ValueError(f"{storage.join(uri, FILE)} is a {other[0]} checkpoint, not a segmenter's: give a `wsss train "
                         f"segmenter` checkpoint ({USES.get(other[0], 'it is not for wsss predict')})")
    if spec is None:
        raise ValueError(f"{storage.join(uri, FILE)} has no segmenter spec (written by an older wsss train); "
                         "retrain or continue training with this version")
    return spec


def load_segmenter(uri: str, options: StorageOptions | None = None) -> tuple[torch.nn.Module, list[str]]:
    """(segmenter in eval mode with the checkpoint's weights, class names with background first)."""
    from wsss_core.models.segmenter import create_segmenter

    state = load_state(uri, options)
    spec = spec_of(state, uri)
    model = create_segmenter(spec["backbone"], len(spec["class_names"]), None, spec["head"], spec["output_stride"])
    model.load_state_dict(state["model"])
    return model.eval(), spec["class_names"]

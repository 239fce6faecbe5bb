"""Network files on storage: what a ``wsss train`` checkpoint holds, loading a network back from one
(local or s3://), and pretrained weights given as a tag, a path or a URI.

``checkpoint.pt`` in each ``checkpoint_*`` folder: ``model`` (state dict), ``optimizer``,
``scheduler``, ``iteration``, and the network's spec under its kind (``segmenter``, ``toco`` or
``affinitynet``: its factory's arguments and class names, ``wsss_core.models.networks``): enough to
rebuild the network with no config at hand (``wsss predict``, the MLflow model, previews, labeling).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from wsss_core.models.networks import kinds_in, network_from_state
from wsss_platform import storage
from wsss_platform.storage import StorageOptions

FILE = "checkpoint.pt"


USES = {"segmenter": "a segmenter predicts with `wsss predict --checkpoint URI`",
        "toco": "a toco network labels with `wsss label cam_source=toco model.checkpoint=URI`",
        "affinitynet": "an affinitynet refines with `wsss label 'refine=[random_walk]' random_walk.checkpoint=URI`"}
"""What each network kind (the name its spec is stored under) is for."""
COMMANDS = {"segmenter": "segmenter", "toco": "toco", "affinitynet": "affinity"}
"""Network kind -> the ``wsss train`` recipe that makes it."""


def resolve_weights(pretrained: str, options: StorageOptions | None = None) -> str | bytes | None:
    """An open_clip tag stays a tag; an ``s3://`` URI is read into bytes; a local path stays a path."""
    if pretrained.lower() in ("", "none"):
        return None
    if "://" in pretrained:
        return storage.read_bytes(pretrained, options)
    return pretrained


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


def spec_of(state: dict[str, Any], uri: str, kind: str = "segmenter") -> dict[str, Any]:
    """The checkpoint's spec of a ``kind`` network (``wsss_core.models.networks``), or an error naming the
    file, what it holds instead and what that is for."""
    spec = state.get(kind)
    other = [k for k in kinds_in(state) if k != kind]
    if spec is None and other:
        raise ValueError(f"{storage.join(uri, FILE)} is a {other[0]} checkpoint, not a {kind}'s: give a `wsss train "
                         f"{COMMANDS[kind]}` checkpoint ({USES[other[0]]})")
    if spec is None:
        raise ValueError(f"{storage.join(uri, FILE)} has no {kind} spec (written by an older wsss train); "
                         "retrain or continue training with this version")
    return spec


def load_network(uri: str, options: StorageOptions | None = None,
                 kind: str = "segmenter") -> tuple[torch.nn.Module, list[str]]:
    """(the ``kind`` network in eval mode with the checkpoint's weights, class names with background first)."""
    state = load_state(uri, options)
    spec_of(state, uri, kind)
    return network_from_state(state, kind)

"""One door for the networks training makes: built by kind from a spec, rebuilt from a checkpoint.

    net = create_network("segmenter", "timm", backbone="resnet50", head="aspp", output_stride=16,
                         class_names=["background", "cat", "dog"])
    state = {"segmenter": net.spec, "model": net.state_dict()}        # what a checkpoint holds
    net, names = network_from_state(state)                           # eval mode, CPU; any kind it holds

A network's ``spec`` (JSON: its factory's arguments, the class names with background first) is
stored under its kind beside ``model`` (the weights), so a checkpoint rebuilds it with no config at
hand. Kinds: ``segmenter`` (``models.segmenter``), ``toco`` (``models.toco``), ``affinitynet``
(``models.affinitynet``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from wsss_core.models.affinitynet import create_affinitynet
from wsss_core.models.segmenter import create_segmenter
from wsss_core.models.toco import create_toco
from wsss_core.models.weights import WeightsSource


def _segmenter(spec: Mapping[str, Any], pretrained: WeightsSource) -> nn.Module:
    return create_segmenter(spec["backbone"], len(spec["class_names"]), pretrained, spec["head"],
                            int(spec["output_stride"]), bool(spec.get("freeze_backbone", False)))


def _toco(spec: Mapping[str, Any], pretrained: WeightsSource) -> nn.Module:
    # ToCo's classifiers have no background
    return create_toco(spec["backbone"], len(spec["class_names"]) - 1, pretrained, int(spec["aux_layer"]),
                       int(spec["proj_dim"]), float(spec.get("momentum", 0.9)))


def _affinitynet(spec: Mapping[str, Any], pretrained: WeightsSource) -> nn.Module:
    return create_affinitynet(spec["backbone"], pretrained, spec["depths"], spec["dims"], int(spec["output_stride"]),
                              float(spec.get("input_scale", 1.0)))  # checkpoints before input_scale: 1


NETWORKS: dict[str, Callable[[Mapping[str, Any], WeightsSource], nn.Module]] = {
    "segmenter": _segmenter, "toco": _toco, "affinitynet": _affinitynet}
"""Kind -> builder of (spec, pretrained weights)."""

TITLES = {"segmenter": "a segmenter", "toco": "a ToCo", "affinitynet": "an AffinityNet"}


def create_network(kind: str, pretrained: WeightsSource = None, **spec: Any) -> nn.Module:
    """The ``kind`` network with the backbone's ``pretrained`` weights; ``net.spec`` is ``spec``.

    Raises:
        ValueError: an unknown kind (the known ones named).
    """
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; known: {', '.join(NETWORKS)}")
    if "class_names" not in spec:
        raise ValueError(f"{kind} spec: class_names (background first) is required")
    net = NETWORKS[kind](spec, pretrained)
    net.spec = {**spec, "class_names": list(spec["class_names"])}
    return net


def kinds_in(state: Mapping[str, Any]) -> list[str]:
    """The network kinds whose spec a checkpoint's contents hold."""
    return [k for k in NETWORKS if isinstance(state.get(k), Mapping)]


def network_from_state(state: Mapping[str, Any], kind: str | None = None) -> tuple[nn.Module, list[str]]:
    """(network in eval mode on CPU with the checkpoint's weights, its class names, background first)
    from a checkpoint's contents; ``kind`` None: whichever kind it holds.

    Raises:
        ValueError: no ``model`` weights, no spec of ``kind`` (what it holds instead named).
    """
    held = kinds_in(state)
    want = kind or (held[0] if held else None)
    if want is None or want not in held or "model" not in state:
        what = f"{TITLES.get(held[0], held[0])} network" if held else "no network spec"
        raise ValueError(f"not {TITLES.get(want, 'a network') if want else 'a network'} checkpoint (it holds {what}"
                         f"{'' if 'model' in state else ' and no model weights'})")
    net = create_network(want, None, **state[want])
    net.load_state_dict(state["model"])
    return net.eval(), list(state[want]["class_names"])

"""The one door to trained networks: a spec and weights rebuild the same network, of each kind."""

import io
import json

import pytest
import torch

from wsss_core.models import create_network, network_from_state

NAMES = ["background", "circle", "square"]
SPECS = {
    "segmenter": {"backbone": "open_clip:tiny", "head": "conv", "output_stride": 16, "freeze_backbone": True},
    "toco": {"backbone": "open_clip:tiny", "aux_layer": -3, "proj_dim": 16},
    "affinitynet": {"backbone": "open_clip:tiny", "depths": [-3, -2, -1], "dims": [4, 4, 8], "output_stride": 8},
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_a_checkpoint_of_each_kind_rebuilds_the_same_network(kind):
    torch.manual_seed(3)
    net = create_network(kind, "none", **SPECS[kind], class_names=NAMES)
    assert net.spec == {**SPECS[kind], "class_names": NAMES}
    buf = io.BytesIO()  # as a checkpoint stores it: the spec as JSON-able values beside the weights
    torch.save({kind: json.loads(json.dumps(net.spec)), "model": net.state_dict()}, buf)
    again, names = network_from_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert names == NAMES and not again.training and type(again) is type(net)
    assert again.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    pixels = torch.randn(1, 3, 32, 48)
    out, want = again(pixels), net.eval()(pixels)
    for a, b in zip(out if isinstance(out, tuple) else [out], want if isinstance(want, tuple) else [want], strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b)


def test_the_class_count_comes_from_the_names():
    seg = create_network("segmenter", "none", **SPECS["segmenter"], class_names=NAMES)
    toco = create_network("toco", "none", **SPECS["toco"], class_names=NAMES)
    assert seg.num_classes == 3 and toco.num_classes == 2  # ToCo's classifiers have no background


def test_a_checkpoint_of_another_kind_or_none_is_named():
    net = create_network("toco", "none", **SPECS["toco"], class_names=NAMES)
    state = {"toco": net.spec, "model": net.state_dict()}
    with pytest.raises(ValueError, match="not an AffinityNet checkpoint \\(it holds a ToCo network\\)"):
        network_from_state(state, "affinitynet")
    with pytest.raises(ValueError, match="not a network checkpoint \\(it holds no network spec"):
        network_from_state({"model": {}})
    with pytest.raises(ValueError, match="no model weights"):
        network_from_state({"toco": net.spec})
    with pytest.raises(ValueError, match="unknown network kind 'unet'; known: segmenter, toco, affinitynet"):
        create_network("unet", backbone="resnet18", class_names=NAMES)
    with pytest.raises(ValueError, match="class_names"):
        create_network("segmenter", **SPECS["segmenter"])

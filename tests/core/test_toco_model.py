"""The ToCo network on small random-weight ViTs (timm and the open_clip visual tower)."""

import pytest
import torch
import torch.nn.functional as F

from wsss_core.cams import toco_cam
from wsss_core.models import create_toco


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "open_clip:tiny"])
def test_toco_outputs_at_odd_sizes(backbone):
    torch.manual_seed(0)
    net = create_toco(backbone, num_classes=5, pretrained="none", proj_dim=32).eval()
    x = torch.randn(2, 3, 70, 90)  # padded to 80×96: a 5×6 grid
    with torch.no_grad():
        out = net(x)
        cam, cam_aux = net.cams(x)
    d = net.backbone.channels[-1]
    assert out["logits"].shape == out["aux_logits"].shape == (2, 5)
    assert out["seg"].shape == (2, 6, 5, 6) and out["tokens"].shape == out["aux_tokens"].shape == (2, d, 5, 6)
    assert out["cls_token"].shape == (2, d)
    # The classifier is global max pooling of the tokens then the bias-free 1×1 conv; the CAM is
    # the same conv on every token.
    w = net.classifier.weight.flatten(1)
    torch.testing.assert_close(out["logits"], out["tokens"].amax(dim=(2, 3)) @ w.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cam, torch.einsum("bdhw,cd->bchw", out["tokens"], w).relu(), rtol=1e-4, atol=1e-5)
    assert cam_aux.shape == (2, 5, 5, 6)
    multi = toco_cam(lambda p: net.cams(p)[0], x, scales=(1.0, 0.5), flip=True)
    assert multi.shape == (2, 5, 70, 90) and multi.min() >= 0 and multi.max() < 1


def test_the_aux_classifier_reads_the_block_it_names():
    torch.manual_seed(1)
    net = create_toco("open_clip:tiny", num_classes=3, pretrained="none", aux_layer=-3, proj_dim=16).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
        depth = len(net.backbone.blocks)
        assert net.backbone.indices == [depth - 3, depth - 1]
        for p in net.backbone.blocks[depth - 2].parameters():  # a block after the auxiliary one
            p.add_(torch.randn_like(p))
        after = net(x)
    torch.testing.assert_close(after["aux_logits"], before["aux_logits"])
    assert not torch.allclose(after["logits"], before["logits"])
    with pytest.raises(ValueError, match="aux_layer=-1"):
        create_toco("open_clip:tiny", num_classes=3, pretrained="none", aux_layer=-1)
    with pytest.raises(ValueError, match="needs a ViT"):
        create_toco("resnet18", num_classes=3, pretrained="none")


def test_ctc_head_and_its_ema_teacher():
    torch.manual_seed(2)
    net = create_toco("vit_tiny_patch16_224", num_classes=3, pretrained="none", proj_dim=16, momentum=0.9)
    cls = torch.randn(4, net.backbone.channels[-1])
    s = net.project(cls)
    torch.testing.assert_close(s, net.project_teacher(cls))  # the teacher starts as the student
    assert s.shape == (4, 16) and s.requires_grad and not net.project_teacher(cls).requires_grad
    w = net.proj.last.weight  # weight-normalised: unit-norm rows, the norm not trained
    torch.testing.assert_close(w.norm(dim=1), torch.ones(16))
    assert not net.proj.last.parametrizations.weight.original0.requires_grad
    student = [p.detach().clone() for p in net.proj.parameters()]
    teacher = [p.detach().clone() for p in net.proj_teacher.parameters()]
    with torch.no_grad():
        for p in net.proj.parameters():
            p.add_(1.0)
    net.update_teacher()
    for t0, s0, t1 in zip(teacher, student, net.proj_teacher.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * (s0 + 1.0))
    groups = net.param_groups(1e-4, 10.0)
    assert groups[1]["lr"] == pytest.approx(1e-3)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in groups for p in g["params"]}  # every trained parameter, once
    loss = F.multilabel_soft_margin_loss(net(torch.randn(2, 3, 48, 48))["logits"], torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    loss.backward()
    assert net.classifier.weight.grad is not None

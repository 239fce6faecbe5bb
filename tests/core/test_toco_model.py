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
    w = net.proj.last_weight  # weight-normalised: unit-norm rows, the norm not trained
    torch.testing.assert_close(w.norm(dim=1), torch.ones(16))
    with torch.no_grad():
        net.proj.last_v.mul_(3.0)  # only the direction counts
    torch.testing.assert_close(net.project(cls), s)
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


def _par_seg_labels_reference(images, cam, labels, high, low, dilations, iterations):
    """Image by image, with the present classes selected (as the authors' script does)."""
    from wsss_core.refine import par

    b, _, h, w = images.shape
    out = torch.full((b, h, w), 255, dtype=torch.long)
    for i in range(b):
        keep = torch.cat([torch.tensor([0]), torch.nonzero(labels[i])[:, 0] + 1])
        img = F.interpolate(images[i:i + 1], size=(h // 2, w // 2), mode="bilinear", align_corners=False)
        found = []
        for bg in (high, low):
            scores = torch.cat([torch.full((1, 1, h, w), bg), cam[i:i + 1]], dim=1)
            scores = F.interpolate(scores, size=(h // 2, w // 2), mode="bilinear", align_corners=False)[:, keep]
            refined = F.interpolate(par(img, scores.softmax(1), dilations, iterations), size=(h, w), mode="bilinear",
                                    align_corners=False)
            found.append(keep[refined.argmax(1)[0]])
        out[i] = torch.where(found[0] != 0, found[0], torch.where(found[1] == 0, 0, 255))
    return out


def test_par_seg_labels_match_the_per_image_reference():
    from wsss_core.losses import par_seg_labels

    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 24, 20, generator=g)
    cam = torch.rand(2, 4, 24, 20, generator=g)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]])
    got = par_seg_labels(images, cam, labels, 0.7, 0.25, (1, 2), 3)
    want = _par_seg_labels_reference(images, cam, labels, 0.7, 0.25, (1, 2), 3)
    assert torch.equal(got, want)
    assert set(got.unique().tolist()) <= {0, 1, 4, 2, 255} and not (got[1] == 1).any()  # absent classes never win


def test_toco_objective_terms_weights_and_gradients():
    from wsss_core.losses import ToCoObjective

    torch.manual_seed(3)
    net = create_toco("open_clip:tiny", num_classes=4, pretrained="none", proj_dim=16)
    pixels = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]])
    objective = ToCoObjective(cam_scales=(1.0, 0.5), local_crops=3, local_crop_size=32, par_dilations=(1, 2),
                              par_iterations=2, seg_from=10)
    with torch.no_grad():  # a student head that has moved from its teacher
        for p in net.proj.parameters():
            p.add_(0.1)
    # the training CAMs take scale 1 from the step's own forward pass: the same as passes of their own
    for fresh, reused in zip(objective.cams(net, pixels), objective.cams(net, pixels, net(pixels)), strict=True):
        torch.testing.assert_close(reused, fresh, rtol=1e-4, atol=1e-5)
    teacher_before = [p.detach().clone() for p in net.proj_teacher.parameters()]
    student_before = [p.detach().clone() for p in net.proj.parameters()]
    terms = objective(net, pixels, labels, iteration=0, generator=torch.Generator().manual_seed(0))
    # no segmentation term before seg_from (not even computed)
    assert set(terms) == {"cls", "aux", "ptc", "ctc", "total"} and all(torch.isfinite(v) for v in terms.values())
    want = terms["cls"] + terms["aux"] + 0.2 * terms["ptc"] + 0.5 * terms["ctc"]
    assert terms["total"].item() == pytest.approx(want.item(), rel=1e-6)
    terms["total"].backward()
    assert net.classifier.weight.grad.abs().sum() > 0 and net.aux_classifier.weight.grad.abs().sum() > 0
    # the head that does not learn yet still has a (zero) gradient: DDP expects one for every parameter
    assert all(p.grad is not None and not p.grad.any() for p in net.seg_head.parameters())
    assert net.proj.mlp[0].weight.grad.abs().sum() > 0  # CTC reaches the projection head
    assert all(p.grad is None for p in net.proj_teacher.parameters())
    for t0, s0, t1 in zip(teacher_before, student_before, net.proj_teacher.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s0)  # one EMA step per batch
    later = objective(net, pixels, labels, iteration=10, generator=torch.Generator().manual_seed(0))
    want = (later["cls"] + later["aux"] + 0.2 * later["ptc"] + 0.5 * later["ctc"] + 0.1 * later["seg"]
            + 0.05 * later["reg"])
    assert later["reg"] <= 0  # an energy of alike neighbours rewarded for agreeing
    assert later["total"].item() == pytest.approx(want.item(), rel=1e-6)
    # without CTC (w_ctc 0): no CTC term and no teacher step; the projection head gets zero gradients
    net.zero_grad()
    teacher = [p.detach().clone() for p in net.proj_teacher.parameters()]
    no_ctc = ToCoObjective(cam_scales=(1.0,), local_crops=3, local_crop_size=32, w_ctc=0.0, seg_from=10)
    terms = no_ctc(net, pixels, labels, iteration=0)
    assert "ctc" not in terms
    assert terms["total"].item() == pytest.approx((terms["cls"] + terms["aux"] + 0.2 * terms["ptc"]).item(), rel=1e-6)
    terms["total"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in net.proj.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher, net.proj_teacher.parameters(), strict=True))


def test_ctc_takes_the_second_global_view_and_cuts_local_crops_from_the_image_it_is_given():
    import copy

    from wsss_core.losses import ToCoObjective

    torch.manual_seed(4)
    net = create_toco("open_clip:tiny", num_classes=3, pretrained="none", proj_dim=16)
    pixels, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1, 0, 1], [0, 1, 0]])
    objective = ToCoObjective(cam_scales=(1.0,), local_crops=2, local_crop_size=32, seg_from=10)

    def ctc(**kw):  # each call moves the EMA teacher: every call starts from the same network
        return objective(copy.deepcopy(net), pixels, labels, 0, generator=torch.Generator().manual_seed(0), **kw)["ctc"]

    default = ctc()
    assert torch.equal(ctc(view=pixels.flip(-1), local=pixels), default)  # the defaults: the mirror, the image
    assert not torch.allclose(ctc(view=torch.randn(2, 3, 48, 48)), default)  # another view, of another size
    assert not torch.allclose(ctc(local=pixels + torch.randn_like(pixels)), default)
    # the backbone sees the second view once, then 2 × 2 local crops cut from the local image
    seen, original = [], net.class_tokens
    net.class_tokens = lambda x: seen.append(x) or original(x)
    objective(net, pixels, labels, 0, local=torch.full_like(pixels, 0.5), view=torch.randn(2, 3, 40, 40))
    assert [x.shape for x in seen] == [(2, 3, 40, 40), (4, 3, 32, 32)] and (seen[1] == 0.5).all()

"""ToCo's whole training objective on one batch (Ru et al., CVPR 2023; the authors' training script).

    objective = ToCoObjective()                       # reference thresholds, weights and crop sizes
    terms = objective(net, pixels, labels, iteration)  # {"cls", "aux", "ptc", "ctc", "seg", "total"}
    terms["total"].backward()

``cls + aux + w_ptc·PTC + w_ctc·CTC``, plus ``w_seg·seg + w_reg·reg`` from iteration ``seg_from`` on
(the segmentation head learns from the CAM once the CAM is worth learning from); ``reg`` is the
dense-CRF energy of the head's softmax (``wsss_core.losses.energy``, scaled by 1e-7 as the authors
do). The CAMs that make the token labels, the CTC crops and the segmentation labels come from the
network itself, without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.cams.toco_cam import toco_cam
from wsss_core.losses.energy import dense_energy_loss
from wsss_core.losses.seg import balanced_seg_loss
from wsss_core.losses.token_contrast import (
    ctc_loss,
    ptc_loss,
    roi_crops,
    roi_map,
    token_labels_from_cam,
)
from wsss_core.masks import IGNORE
from wsss_core.refine.par import par


def par_seg_labels(images: torch.Tensor, cam: torch.Tensor, labels: torch.Tensor, high: float = 0.7,
                   low: float = 0.25, dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24), iterations: int = 10,
                   down_scale: int = 2) -> torch.Tensor:
    """Segmentation labels from a CAM refined by PAR, with a background band left out.

    The present classes' CAMs compete with a constant background (once ``high``, once ``low``) in a
    softmax, each refined by PAR on the image at 1/``down_scale``, then argmax at full size. A
    pixel is its class where the high-background version says so, background where both versions
    say background, and 255 where they disagree.

    Args:
        images: [B, 3, H, W] (normalised or not: PAR's weights are the same).
        cam: [B, C, H, W] in [0, 1]; labels: [B, C] multi-hot.

    Returns:
        long [B, H, W]: 0 background, 1..C, 255.
    """
    h, w = images.shape[-2:]
    small = (h // down_scale, w // down_scale)
    img = F.interpolate(images.float(), size=small, mode="bilinear", align_corners=False)
    present = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).bool()  # [B, 1 + C]
    # PAR only on the background and the present classes (absent ones would stay 0 anyway): each image's
    # present channels first, padded to the batch's largest count; ``keep`` maps them back to class ids.
    keep = present.int().argsort(dim=1, descending=True, stable=True)[:, :int(present.sum(1).max())]  # [B, k]
    kept = present.gather(1, keep)[:, :, None, None]
    out = []
    for bg in (high, low):
        scores = torch.cat([torch.full_like(cam[:, :1], bg), cam], dim=1)
        scores = F.interpolate(scores, size=small, mode="bilinear", align_corners=False)
        scores = scores.gather(1, keep[:, :, None, None].expand(-1, -1, *small))
        probs = scores.masked_fill(~kept, float("-inf")).softmax(dim=1)  # padding: 0, and stays 0
        refined = F.interpolate(par(img, probs, dilations, iterations), size=(h, w), mode="bilinear",
                                align_corners=False)
        out.append(keep.gather(1, refined.masked_fill(~kept, float("-inf")).argmax(dim=1).flatten(1)).view(-1, h, w))
    by_high, by_low = out
    return torch.where(by_high != 0, by_high, torch.where(by_low == 0, 0, IGNORE))


@dataclass(frozen=True)
class ToCoObjective:
    """The reference values of the authors' VOC script (COCO: ``high`` 0.65, ``temp`` 1.0)."""

    high: float = 0.7
    low: float = 0.25
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    local_crops: int = 8
    local_crop_size: int = 96
    temp: float = 0.5
    w_ptc: float = 0.2
    w_ctc: float = 0.5
    w_seg: float = 0.1
    w_reg: float = 0.05
    seg_from: int = 2000
    reg_scale: float = 1e-7
    reg_sigma_rgb: float = 15.0
    reg_sigma_xy: float = 100.0
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iterations: int = 10

    def cams(self, net, pixels: torch.Tensor, out: dict[str, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final and auxiliary multi-scale + flip CAMs [B, C, H, W], without gradients; ``out``, the
        network's forward pass on ``pixels``, gives the unflipped scale 1 without another pass."""
        c = net.classifier.out_channels
        with torch.no_grad():
            known = None if out is None else torch.cat(net.cams_of(out["tokens"], out["aux_tokens"]), dim=1)
            both = toco_cam(lambda p: torch.cat(net.cams(p), dim=1), pixels, self.cam_scales, flip=True, known=known)
        return both[:, :c], both[:, c:]

    def __call__(self, net, pixels: torch.Tensor, labels: torch.Tensor, iteration: int,
                 view: torch.Tensor | None = None, local: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All loss terms of one batch.

        Args:
            net: a :class:`wsss_core.models.toco.ToCo`.
            pixels: normalised [B, 3, H, W] (H, W > ``local_crop_size``).
            labels: [B, C] multi-hot image-level labels.
            iteration: the training iteration (the segmentation term counts from ``seg_from``).
            view: CTC's second global view [B, 3, h, w], normalised (the authors: a random resized
                crop of the whole image, colour-jittered); the first is ``pixels`` itself. Default:
                the mirror of ``pixels``.
            local: what CTC's local crops are cut from [B, 3, H, W]: ``pixels``' geometry (the ROI
                comes from its CAM) under another colour jitter. Default: ``pixels``.
            generator: for the local crops' positions.
            valid: bool [B, H, W], False on the crop's padding (the authors' image box): its tokens
                and pixels get no token or segmentation label, and no CRF energy.

        Returns:
            ``cls``, ``aux``, ``ptc``, ``ctc`` (when ``w_ctc`` > 0), ``seg`` and ``reg`` (from
            ``seg_from`` on) and their weighted sum ``total`` (scalars). A term that does not count
            is not computed; the heads it would train still enter ``total`` times 0, so that
            data-parallel training sees a gradient (zero) for every parameter at every step.
        """
        labels = labels.float()
        out = net(pixels)
        cam, cam_aux = self.cams(net, pixels, out)
        terms = {"cls": F.multilabel_soft_margin_loss(out["logits"], labels),
                 "aux": F.multilabel_soft_margin_loss(out["aux_logits"], labels)}
        tokens = out["tokens"]
        grid_cam = F.interpolate(cam_aux, size=tokens.shape[-2:], mode="bilinear", align_corners=False)
        grid_valid = None if valid is None else F.interpolate(valid[:, None].float(), size=tokens.shape[-2:],
                                                              mode="nearest")[:, 0].bool()
        token_labels = token_labels_from_cam(grid_cam, labels, self.high, self.low, grid_valid).flatten(1)
        terms["ptc"] = ptc_loss(tokens.flatten(2).transpose(1, 2), token_labels)
        total = terms["cls"] + terms["aux"] + self.w_ptc * terms["ptc"]
        if self.w_ctc > 0:
            terms["ctc"] = self._ctc(net, pixels if local is None else local, labels, cam_aux, out["cls_token"],
                                     pixels.flip(-1) if view is None else view, generator)
            total = total + self.w_ctc * terms["ctc"]
        else:
            total = total + 0.0 * sum(p.sum() for p in net.proj.parameters() if p.requires_grad)
        if iteration >= self.seg_from:
            terms |= self._seg(net, pixels, labels, cam, out["seg"], valid)
            total = total + self.w_seg * terms["seg"] + self.w_reg * terms["reg"]
        else:
            total = total + 0.0 * out["seg"].sum()
        terms["total"] = total
        return terms

    def _seg(self, net, pixels, labels, cam, seg, valid) -> dict[str, torch.Tensor]:
        """The segmentation head's balanced CE on PAR-refined CAM labels, and its CRF energy."""
        seg_labels = par_seg_labels(pixels, cam, labels, self.high, self.low, self.par_dilations, self.par_iterations)
        roi = torch.ones_like(seg_labels, dtype=torch.float32) if valid is None else valid.float()
        if valid is not None:
            seg_labels = seg_labels.masked_fill(~valid, IGNORE)
        seg = F.interpolate(seg, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        rgb = (pixels * net.std + net.mean) * 255
        return {"seg": balanced_seg_loss(seg, seg_labels),
                "reg": self.reg_scale * dense_energy_loss(rgb, seg.softmax(1), roi, seg_labels, self.reg_sigma_rgb,
                                                          self.reg_sigma_xy)}

    def _ctc(self, net, local, labels, cam_aux, cls_token, view, generator) -> torch.Tensor:
        b = local.shape[0]
        crops, flags = roi_crops(local, roi_map(cam_aux, labels, self.high, self.low), self.local_crops,
                                 self.local_crop_size, generator)
        net.update_teacher()
        # the first global view is the training image, whose class token the forward pass already gave
        global_cls = torch.stack([cls_token, net.class_tokens(view)], dim=1).flatten(0, 1)  # [B·2, D], image-major
        teacher = net.project_teacher(global_cls).view(b, 2, -1)
        local = net.project(net.class_tokens(crops.flatten(0, 1))).view(b, self.local_crops, -1)
        student = torch.cat([net.project(global_cls).view(b, 2, -1), local], dim=1)
        return ctc_loss(student, teacher, torch.cat([torch.ones_like(flags[:, :2]), flags], dim=1), self.temp)


class ToCoTraining(nn.Module):
    """The network and its objective as one module whose ``forward`` is a training step's loss terms.

    The objective runs the backbone several times per step (CAMs, the mirrored view, the local
    crops) through methods other than ``forward``; wrapped like this, data-parallel training
    (DDP) sees all of them inside the one forward it hooks, so every gradient is synchronised.
    """

    def __init__(self, net: nn.Module, objective: ToCoObjective) -> None:
        super().__init__()
        self.net, self.objective = net, objective

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor, iteration: int, valid: torch.Tensor | None = None,
                view: torch.Tensor | None = None, local: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.objective(self.net, pixels, labels, iteration, view=view, local=local, valid=valid)

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 0.01) -> list[dict]:
        return self.net.param_groups(lr, head_lr_mult, weight_decay)

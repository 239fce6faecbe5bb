"""The dense-CRF energy regulariser of ToCo's segmentation head (Tang et al., ECCV 2018, "On
regularized losses for weakly-supervised CNN segmentation"), in plain torch.

Pixels that look alike and lie close should get the same class: with the bilateral Gaussian
``W_ij = exp(−|p_i − p_j|² / 2σ_xy² − |I_i − I_j|² / 2σ_rgb²)`` and the softmax ``S``, the energy is
``−Σ_k S_kᵀ (G ⊙ W S_k)`` per image, averaged over the batch. ``G`` (no gradient) gates it to where
the CAM labels are unsure: ``G = max(roi − max_k S_k, 0)``, 1 on unlabelled (255) pixels. As in
the authors' code, the gradient is taken as ``−2 G ⊙ W S`` (their C++ filter's backward), and all
is computed at ``scale`` of the input size. The authors filter with a permutohedral lattice; here
``W S`` is computed exactly, ``chunk`` rows of W at a time (memory ``chunk × N``), which suits crops
up to a few hundred pixels a side at half resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_core.masks import IGNORE


def bilateral_filter(images: torch.Tensor, maps: torch.Tensor, sigma_rgb: float, sigma_xy: float,
                     chunk: int = 512) -> torch.Tensor:
    """``W S`` with the dense bilateral Gaussian (self-weight 1 included).

    Args:
        images: [B, 3, h, w] colours (0–255); maps: [B, K, h, w].

    Returns:
        [B, K, h, w].
    """
    b, k, h, w = maps.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=maps.device), torch.arange(w, device=maps.device), indexing="ij")
    xy = torch.stack([ys, xs]).flatten(1).T.to(maps.dtype) / sigma_xy  # [N, 2]
    feats = torch.cat([xy.expand(b, -1, -1), images.flatten(2).transpose(1, 2).to(maps.dtype) / sigma_rgb], -1)
    # -|a - b|²/2 = a·b - |a|²/2 - |b|²/2 = [a, -|a|²/2, 1]·[b, 1, -|b|²/2]: the exponent in one batched
    # matmul (no N × N broadcast sum, no square root as cdist takes)
    half_sq, ones = -0.5 * feats.pow(2).sum(-1, keepdim=True), torch.ones_like(feats[..., :1])
    rows, cols = torch.cat([feats, half_sq, ones], -1), torch.cat([feats, ones, half_sq], -1).transpose(1, 2)
    values = maps.flatten(2).transpose(1, 2)  # [B, N, K]
    out = []
    for start in range(0, h * w, chunk):
        # the exponent's floor: below -87 exp gives float32 subnormals, which CPUs compute ~10× slower;
        # a weight of e^-80 (1e-35) instead of less changes no sum that holds the self-weight 1
        kernel = torch.bmm(rows[:, start:start + chunk], cols).clamp_(-80.0, 0.0).exp_()  # [B, n, N]
        out.append(torch.bmm(kernel, values))  # [B, n, K]
    return torch.cat(out, dim=1).transpose(1, 2).reshape(b, k, h, w)


def dense_energy_loss(images: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor, labels: torch.Tensor,
                      sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale: float = 0.5,
                      chunk: int = 512) -> torch.Tensor:
    """The gated dense-CRF energy of the segmentation head's softmax (unweighted: the authors scale it
    by 1e-7, then by w_reg).

    Args:
        images: [B, 3, H, W] colours 0–255 (not normalised).
        probs: [B, K, H, W] the head's softmax.
        roi: [B, H, W] 1 inside the image (0 on crop padding).
        labels: long [B, H, W] the segmentation labels (255 = unlabelled).
        sigma_rgb, sigma_xy: reference 15 and 100 (σ_xy in input pixels; scaled with the image).

    Returns:
        scalar.
    """
    size = (int(images.shape[-2] * scale), int(images.shape[-1] * scale))
    img = F.interpolate(images.float(), size=size, mode="nearest")
    s = F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)
    r = F.interpolate(roi[:, None].float(), size=size, mode="nearest")[:, 0]
    unlabelled = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0] == IGNORE
    with torch.no_grad():
        gate = torch.where(unlabelled, torch.ones_like(r), r - s.amax(dim=1)).clamp_min(0)[:, None]
    s = s * r[:, None]
    ws = bilateral_filter(img, s.detach(), sigma_rgb, sigma_xy * scale, chunk) * gate
    # value −Σ S·(G⊙WS), gradient −2 G⊙WS: the second term only fixes the value
    return -(2 * (s * ws).sum() - (s.detach() * ws).sum()) / s.shape[0]

"""ToCo's token contrast (Ru et al., CVPR 2023, Sec. 3.2–3.3): patch-token contrast (PTC) and
class-token contrast (CTC).

Deep ViT blocks over-smooth: their patch tokens grow alike, so the final CAM spreads over the
whole image. PTC pulls together the final-layer tokens that the auxiliary CAM (of an intermediate
block, less smooth) gives the same label, and pushes apart those it gives different labels.
Token labels come from a CAM with two thresholds: confident foreground, confident background,
and an uncertain band in between that takes no part. CTC compares the class token of the whole
image (the EMA teacher's two global views) with those of local crops taken where the CAM is unsure:
crops that hold uncertain or foreground pixels are positives, crops of mostly confident background
negatives, so that the uncertain regions' class tokens move towards the image's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_core.masks import IGNORE


def token_labels_from_cam(cam: torch.Tensor, labels: torch.Tensor, high: float = 0.7, low: float = 0.25,
                          valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token labels from a CAM (ToCo's ``cam_to_label`` with the uncertain band ignored).

    Args:
        cam: [B, C, h, w] class activations in [0, 1] (all C foreground classes).
        labels: [B, C] multi-hot image-level labels; absent classes do not compete.
        high: a max over present classes above ``high`` labels the token with that class
            (reference 0.7; COCO 0.65).
        low: at or below ``low`` the token is background (reference 0.25).
        valid: optional bool [B, h, w]: tokens outside it (padding of the crop) are uncertain.

    Returns:
        long [B, h, w]: 0 background, 1..C a class, 255 uncertain (``low < max <= high``).
    """
    present = cam * labels[:, :, None, None].to(cam.dtype)
    value, cls = present.max(dim=1)
    out = torch.where(value > high, cls + 1, torch.full_like(cls, IGNORE))
    out = torch.where(value <= low, torch.zeros_like(cls), out)
    if valid is not None:
        out = torch.where(valid, out, torch.full_like(cls, IGNORE))
    return out


def pair_labels(token_labels: torch.Tensor) -> torch.Tensor:
    """Pairwise labels of the tokens of each image (ToCo's ``label_to_aff_mask``).

    Args:
        token_labels: long [B, N] (255 = uncertain).

    Returns:
        long [B, N, N]: 1 same label, 0 different labels, 255 when either token is uncertain or i = j.
    """
    same = (token_labels[:, :, None] == token_labels[:, None, :]).long()
    uncertain = (token_labels == IGNORE)
    skip = uncertain[:, :, None] | uncertain[:, None, :]
    skip = skip | torch.eye(token_labels.shape[1], dtype=torch.bool, device=token_labels.device)
    return torch.where(skip, torch.full_like(same, IGNORE), same)


def ptc_loss(tokens: torch.Tensor, token_labels: torch.Tensor) -> torch.Tensor:
    """Patch-token contrast on the final-layer patch tokens.

    With ``c_ij = |cos(t_i, t_j)|`` over the token pairs of each image,
    ``0.5 · (1 − Σ_pos c / (n_pos + 1)) + 0.5 · Σ_neg c / (n_neg + 1)``, sums and counts over the
    whole batch (background–background pairs are positives).

    Args:
        tokens: [B, N, D] final-layer patch tokens.
        token_labels: long [B, N] from :func:`token_labels_from_cam` (flattened), 255 = uncertain.

    Returns:
        scalar loss in [0, 1].
    """
    t = F.normalize(tokens.float(), p=2, dim=-1, eps=1e-8)
    c = (t @ t.transpose(1, 2)).abs()
    pairs = pair_labels(token_labels)
    pos, neg = (pairs == 1).to(c.dtype), (pairs == 0).to(c.dtype)
    return 0.5 * (1 - (pos * c).sum() / (pos.sum() + 1)) + 0.5 * (neg * c).sum() / (neg.sum() + 1)


def roi_map(cam: torch.Tensor, labels: torch.Tensor, high: float = 0.7, low: float = 0.25) -> torch.Tensor:
    """Where the (auxiliary) CAM is sure: 0 background (max ≤ low), 2 foreground (max ≥ high), 1 between.

    Args:
        cam: [B, C, H, W] in [0, 1]; labels: [B, C] multi-hot (absent classes do not count).

    Returns:
        long [B, H, W].
    """
    value = (cam * labels[:, :, None, None].to(cam.dtype)).amax(dim=1)
    return (value > low).long() + (value >= high).long()


def roi_crops(images: torch.Tensor, roi: torch.Tensor, num: int, size: int = 96,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC's local crops: centred on random pixels that are not confident foreground (roi ≤ 1; any
    pixel when fewer than ``num`` are), negative when their roi values sum to ≤ 0.2·size²
    (mostly confident background), positive otherwise.

    Args:
        images: [B, 3, H, W] (H, W > size); roi: long [B, H, W] from :func:`roi_map`.
        num: crops per image (reference ncrops − 2 = 8); size: reference 96.

    Returns:
        crops [B, num, 3, size, size] and flags float [B, num]: 1 positive, 0 negative.
    """
    b, _, h, w = images.shape
    m = size // 2
    inner = roi[:, m:h - m, m:w - m]
    weights = (inner <= 1).flatten(1).float()
    weights = torch.where(weights.sum(1, keepdim=True) < num, torch.ones_like(weights), weights)
    pick = torch.multinomial(weights, num, replacement=False, generator=generator)  # [B, num]
    y0, x0 = pick // inner.shape[-1], pick % inner.shape[-1]  # top-left corners in the full image
    ys = (y0[..., None] + torch.arange(size, device=images.device))[..., :, None]  # [B, num, size, 1]
    xs = (x0[..., None] + torch.arange(size, device=images.device))[..., None, :]  # [B, num, 1, size]
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    crops = images.permute(0, 2, 3, 1)[bi, ys, xs].permute(0, 1, 4, 2, 3)
    flags = (roi[bi, ys, xs].flatten(2).sum(-1) > 0.2 * size * size).float()
    return crops, flags


def ctc_loss(student: torch.Tensor, teacher: torch.Tensor, flags: torch.Tensor, temp: float = 0.5) -> torch.Tensor:
    """Class-token contrast between the teacher's global views and the student's crops.

    ``s_vn = exp(t_v · u_n / temp)`` for teacher view v and student crop n. Per image, each positive
    crop adds ``−log(s_vn / (s_vn + Σ_neg s_v + 1e-4))`` and one more term ``−log(1 / (1 + Σ_neg s_v + 1e-4))``
    is added, summed over the two views and divided by 2·(n_pos + 1e-4); the mean over the batch.

    Args:
        student: [B, n, K] projection-head outputs of all crops (the 2 global views first).
        teacher: [B, 2, K] the EMA teacher's outputs of the 2 global views.
        flags: [B, n]: 1 positive crop (the global views always), 0 negative.
        temp: reference 0.5 (COCO 1.0).

    Returns:
        scalar.
    """
    s = torch.exp(torch.einsum("bvk,bnk->bvn", teacher.float(), student.float()) / temp)  # [B, 2, n]
    pos = flags[:, None, :].to(s.dtype)
    neg = (s * (1 - pos)).sum(-1, keepdim=True)  # [B, 2, 1]
    per_crop = -torch.log(s / (s + neg + 1e-4)) * pos
    extra = torch.log(1 + neg + 1e-4)
    per_image = (per_crop.sum((1, 2)) + extra.sum((1, 2))) / 2 / (flags.sum(-1) + 1e-4)
    return per_image.mean()

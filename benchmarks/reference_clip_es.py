"""A reference-style CLIP-ES loop, as the authors' code runs it: one image at a time, one
backward per present class through open_clip's own forward (Grad-CAM hook on the last block's
first LayerNorm), then CAA one class at a time. The oracle for tests and the baseline of
``benchmarks/cams.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsss_core.models.clip import ClipViT
from wsss_core.refine import caa


def reference_cams(vit: ClipViT, fg: torch.Tensor, bg: torch.Tensor, image: np.ndarray, labels: list[int],
                   dtype: torch.dtype | None = None, softmax: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class Softmax-GradCAM for one image (``softmax=False``: plain GradCAM of the logit).

    Returns:
        cams [K, h, w] min–max normalised, scores [K] (softmax of the present classes),
        attn [N, N] (head-averaged attention of the last block, for a CAA step).
    """
    visual = vit.visual
    device = visual.conv1.weight.device
    pixels = vit.preprocess(torch.from_numpy(image)[None].to(device)).requires_grad_(True)
    gh, gw = pixels.shape[2] // vit.patch_size, pixels.shape[3] // vit.patch_size
    original_pe, original_pool = visual.positional_embedding, visual.pool_type
    g = vit.base_grid
    patch = original_pe[1:].detach().reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=(gh, gw), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).reshape(gh * gw, -1)
    new_pe = torch.cat([original_pe[:1].detach(), patch.to(original_pe.dtype)])
    visual.positional_embedding = torch.nn.Parameter(new_pe, requires_grad=False)
    visual.pool_type = "avg"
    captured = {}

    def hook(_module, _inp, out):
        out.retain_grad()
        captured["A"] = out

    handle = visual.transformer.resblocks[-1].ln_1.register_forward_hook(hook)
    cams, scores = [], None
    try:
        text = torch.cat([fg[torch.tensor(labels, device=fg.device) - 1], bg])
        for j in range(len(labels)):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                emb = F.normalize(visual(pixels).float(), dim=-1)
            logits = vit.logit_scale * emb @ text.T
            s = logits.softmax(-1)
            (s if softmax else logits)[0, j].backward()
            a, grad = captured["A"][0, 1:].float(), captured["A"].grad[0, 1:].float()
            cam = (a * grad.mean(0)).sum(-1).relu()
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
            cams.append(cam.detach().view(gh, gw))
            scores = s[0, : len(labels)].detach()
        with torch.no_grad():
            y = captured["A"].detach()
            attn = visual.transformer.resblocks[-1].attn(y, y, y, need_weights=True)[1][0, 1:, 1:].float()
    finally:
        handle.remove()
        visual.positional_embedding, visual.pool_type = original_pe, original_pool
    return torch.stack(cams), scores, attn


def reference_clip_es(vit: ClipViT, fg: torch.Tensor, bg: torch.Tensor, image: np.ndarray, labels: list[int],
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """CAMs then CAA, one class at a time: refined [K, h, w]."""
    cams, _, attn = reference_cams(vit, fg, bg, image, labels, dtype)
    return torch.cat([caa(cams[k:k + 1], attn) for k in range(cams.shape[0])])

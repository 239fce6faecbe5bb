"""open_clip ViT wrapper for CLIP-ES (Lin et al., CVPR 2023).

One forward gives what Softmax-GradCAM and CAA need: the tokens entering the last block, and the
head-averaged self-attention of the last L blocks. Blocks whose attention is not needed run
open_clip's own fused (scaled-dot-product) path. Images of any size: the patch grid follows the
image and the positional embedding (patch part) is interpolated bilinearly, CLS kept.

Letters: B images, S = 1 + N tokens (CLS first), N = h·w patches, D width, E embedding size,
T text classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from wsss_core.models.grid import resize_pos_embed
from wsss_core.models.weights import (
    WeightsSource,
    check_clip_name,
    is_random,
    is_weights_file,
    load_weights,
    model_config,
)


def create_clip(name: str = "ViT-B-16", pretrained: WeightsSource = "openai") -> tuple[torch.nn.Module, Any]:
    """Build an open_clip model and its tokenizer.

    Args:
        name: an open_clip model name (``ViT-B-16``), a path to an open_clip model-config JSON
            (custom architecture), or a packaged config name (``tiny``: a small random ViT for tests;
            :func:`wsss_core.models.weights.packaged_configs`).
        pretrained: an open_clip pretrained tag (``openai``), a weights file (path, bytes or an open
            binary file: ``.safetensors``, ``.pt``, ``.bin``, TorchScript), or None/``none`` (random).

    Returns:
        (model in eval mode, tokenizer callable: list[str] -> int64 [T, context_length]).
    """
    random = is_random(pretrained)
    from_file = is_weights_file(pretrained)
    cfg = model_config(name)
    if cfg is not None:
        if not from_file and not random:
            raise ValueError(f"pretrained={pretrained!r}: a custom config ({name}) takes a weights file or none, not a tag")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random custom model is the same everywhere
            model = open_clip.CLIP(**cfg)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
    else:
        check_clip_name(name)
        model = open_clip.create_model(name, pretrained=None if from_file or random else pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    if from_file:
        assert pretrained is not None
        load_weights(model, pretrained, name)
    return model.eval(), tokenizer


class ClipViT(torch.nn.Module):
    """The pieces of an open_clip CLIP that CLIP-ES uses, with variable image sizes.

    Args:
        model: an open_clip ``CLIP`` whose visual tower is a ``VisionTransformer``.
        tokenizer: its tokenizer.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise ValueError("CLIP-ES needs an open_clip ViT image tower (visual.conv1 + visual.transformer)")
        self.model, self.visual, self.tokenizer = model, visual, tokenizer
        self.blocks = list(visual.transformer.resblocks)
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.width = int(visual.conv1.out_channels)
        self.num_heads = int(self.blocks[-1].attn.num_heads)
        pe = visual.positional_embedding
        self.base_grid = round(math.sqrt(pe.shape[0] - 1))
        mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._pos_cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}
        self.eval().requires_grad_(False)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid for an image: the nearest multiple of the patch size, at least one patch."""
        p = self.patch_size
        return max(1, int(height / p + 0.5)), max(1, int(width / p + 0.5))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float [B, 3, h·p, w·p] (bicubic resize when needed)."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        gh, gw = self.grid_size(x.shape[2], x.shape[3])
        size = (gh * self.patch_size, gw * self.patch_size)
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        return (x - self.mean) / self.std

    def positional_embedding(self, gh: int, gw: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[1 + gh·gw, D]: CLS kept, patch part interpolated bilinearly from the trained grid."""
        key = (gh, gw, device, dtype)
        if key not in self._pos_cache:
            pe = self.visual.positional_embedding.detach()
            grid = (self.base_grid, self.base_grid)
            self._pos_cache[key] = resize_pos_embed(pe, grid, (gh, gw)).to(device=device, dtype=dtype)
        return self._pos_cache[key]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, h·p, w·p] -> tokens [B, S, D] entering the first block."""
        v = self.visual
        x = v.conv1(pixels.to(v.conv1.weight.dtype))
        gh, gw = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(gh, gw, x.device, x.dtype)
        return v.ln_pre(x)

    def _attention_probs(self, block: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention probabilities [B, S, S] of ``block`` on its normalised input ``y``."""
        attn = block.attn
        q, k = F.linear(y, attn.in_proj_weight[: 2 * self.width], attn.in_proj_bias[: 2 * self.width]).chunk(2, dim=-1)
        b, s, _ = y.shape
        hd = self.width // self.num_heads
        q = q.view(b, s, self.num_heads, hd).transpose(1, 2)
        k = k.view(b, s, self.num_heads, hd).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).float() * hd**-0.5
        return logits.softmax(-1).mean(1)

    def _block_with_probs(self, block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``block`` with explicit attention, returning (output [B, S, D], probs [B, S, S])."""
        y = block.ln_1(x)
        attn = block.attn
        b, s, _ = y.shape
        hd = self.width // self.num_heads
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.num_heads, hd).transpose(1, 2) for t in (q, k, v))
        probs = ((q @ k.transpose(-1, -2)).float() * hd**-0.5).softmax(-1)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, s, self.width)
        x = x + block.ls_1(attn.out_proj(out))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, probs.mean(1)

    @torch.no_grad()
    def forward_features(self, pixels: torch.Tensor, attn_layers: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Everything before the last block, plus the CAA attention.

        Args:
            pixels: normalised float [B, 3, h·p, w·p].
            attn_layers: L, how many last blocks' attention to average (clamped to the depth).

        Returns:
            x_last: tokens entering the last block, [B, S, D].
            attn: head- and block-averaged attention among patch tokens, float32 [B, N, N]
                (CLS row and column dropped).
            grid: (h, w).
        """
        x, attn, grid = self.forward_features_multi(pixels, [attn_layers])
        return x, next(iter(attn.values())), grid

    @torch.no_grad()
    def forward_features_multi(self, pixels: torch.Tensor, attn_layers: Sequence[int]
                               ) -> tuple[torch.Tensor, dict[int, torch.Tensor], tuple[int, int]]:
        """:meth:`forward_features` for several L at once (a sweep over L needs one forward), or for
        none (``attn_layers`` empty: only ``x_last``).

        Returns:
            x_last [B, S, D]; {L: attention [B, N, N] averaged over the last L blocks} (each L
            clamped to [1, depth]); grid (h, w).
        """
        x = self.embed(pixels)
        grid = (pixels.shape[2] // self.patch_size, pixels.shape[3] // self.patch_size)
        depth = self.depth
        ls = sorted({max(1, min(int(n), depth)) for n in attn_layers})
        if not ls:  # no attention wanted: every block but the last on the fused path
            for block in self.blocks[:-1]:
                x = block(x)
            return x, {}, grid
        start = depth - ls[-1]
        # Running sum over the window; a smaller L's sum is the total minus the sum before its start.
        before: dict[int, torch.Tensor | None] = {}
        acc: torch.Tensor | None = None
        for i, block in enumerate(self.blocks):
            for n in ls:
                if i == depth - n:
                    before[n] = acc
            if i == depth - 1:
                probs = self._attention_probs(block, block.ln_1(x))
            elif i >= start:
                x, probs = self._block_with_probs(block, x)
            else:
                x = block(x)
                continue
            acc = probs if acc is None else acc + probs
        assert acc is not None
        out = {}
        for n in ls:
            prev = before.get(n)
            total = acc if prev is None else acc - prev
            out[n] = (total / n)[:, 1:, 1:].contiguous()
        return x, out, grid

    def last_block_embedding(self, feats: torch.Tensor, x_last: torch.Tensor) -> torch.Tensor:
        """Image embedding from the last block's normalised input.

        Args:
            feats: A = ln_1(x_last), [P, S, D] (the Grad-CAM target; gradients flow from here).
            x_last: the residual stream entering the last block, [P, S, D].

        Returns:
            L2-normalised image embeddings [P, E]: last block, final LayerNorm, mean of patch
            tokens, projection.
        """
        block, v = self.blocks[-1], self.visual
        h = x_last + block.ls_1(block.attn(feats, feats, feats, need_weights=False)[0])
        h = h + block.ls_2(block.mlp(block.ln_2(h)))
        h = v.ln_post(h)
        pooled = h[:, 1:].mean(1)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled.float(), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text features, float32 [T, E]."""
        device = self.visual.conv1.weight.device
        tokens = self.tokenizer(texts).to(device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

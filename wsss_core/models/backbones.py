"""Image backbones shared by the segmenter, ToCo and AffinityNet: a timm model (CNN or ViT) or the
visual tower of an open_clip model, with one interface and positional embeddings resized to any grid.

    bb = create_backbone("resnet50", pretrained="timm", output_stride=16)
    bb = create_backbone("vit_base_patch16_224", pretrained="none", out_indices=(-4, -1))
    bb = create_backbone("open_clip:ViT-B-16", pretrained="openai")        # or open_clip:<config.json>
    feats = bb(pixels)   # [B, 3, H, W] normalised with bb.mean / bb.std -> [B, C_i, h_i, w_i] each

Letters: B images, D width, (h, w) the grid, N = h·w patches, P prefix tokens (CLS).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from wsss_core.models.clip import create_clip
from wsss_core.models.grid import pad_to_multiple, resize_pos_embed
from wsss_core.models.weights import WeightsSource, check_clip_name, is_weights_file, load_weights

OPEN_CLIP_PREFIX = "open_clip:"


class Backbone(nn.Module):
    """``forward(pixels [B, 3, H, W]) -> list of [B, C_i, h_i, w_i]`` (the chosen stages or blocks).

    Attributes: ``channels`` (C_i), ``stride`` (of the last map), ``mean``/``std`` (the
    normalisation its weights expect, RGB in [0, 1]), ``patch_size`` (ViTs; 0 for CNNs).
    """

    channels: list[int]
    stride: int
    patch_size: int = 0
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def forward_with_cls(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """ViTs: the maps of :meth:`forward` and the class token [B, D] after the last chosen block."""
        raise NotImplementedError

    def attention_blocks(self) -> list[nn.Module]:
        """ViTs: each kept block's attention module, in order (its first input: the normalised tokens)."""
        raise ValueError("a CNN backbone has no attention; use a ViT")

    def attention_probs(self, attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention probabilities [B, S, S] of ``attn`` on its input tokens ``y`` [B, S, D]."""
        raise NotImplementedError

    num_prefix_tokens: int = 1

    @torch.no_grad()
    def attention(self, pixels: torch.Tensor, last: Sequence[int]) -> dict[int, torch.Tensor]:
        """Attention among the patch tokens averaged over heads and over the last L blocks, for each L.

        Args:
            pixels: normalised [B, 3, H, W] (H, W multiples of the patch size).
            last: the L values (each clamped to 1..depth).

        Returns:
            {L: float32 [B, N, N]} with N = h·w, the rows the attending tokens.
        """
        blocks = self.attention_blocks()
        depth, seen = len(blocks), {}
        wanted = {n: max(1, min(int(n), depth)) for n in last}
        first = depth - max(wanted.values(), default=0)
        hooks = [blk.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
                 for i, blk in enumerate(blocks) if i >= first]
        try:
            self.forward_with_cls(pixels)
        finally:
            for h in hooks:
                h.remove()
        p = self.num_prefix_tokens
        probs = {i: self.attention_probs(blocks[i], y)[:, p:, p:].float() for i, y in seen.items()}
        return {n: torch.stack([probs[i] for i in range(depth - k, depth)]).mean(0) for n, k in wanted.items()}


class TimmBackbone(Backbone):
    """A timm CNN through ``features_only`` (dilated to ``output_stride``), or a timm ViT through its
    blocks' patch tokens reshaped to the grid (``dynamic_img_size``: any input size, padded)."""

    def __init__(self, name: str, pretrained: WeightsSource = None, output_stride: int = 16,
                 out_indices: Sequence[int] = (-1,)) -> None:
        import timm

        super().__init__()
        use_timm = pretrained == "timm"
        with torch.device("meta"):  # learn the model's kind without building real weights
            probe = timm.create_model(name, pretrained=False, num_classes=0)
        self.is_vit = hasattr(probe, "blocks") and hasattr(probe, "patch_embed")
        if self.is_vit:
            self.model = timm.create_model(name, pretrained=use_timm, num_classes=0, dynamic_img_size=True,
                                           dynamic_img_pad=True)
            depth = len(self.model.blocks)
            self.indices = [i % depth for i in out_indices]
            # every parameter must take part in the loss (DDP): no blocks past the last used, no final norm, no head
            self.model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
            self.channels = [int(self.model.embed_dim)] * len(self.indices)
            self.patch_size = self.stride = int(self.model.patch_embed.patch_size[0])
            self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        else:
            n_stages = len(probe.feature_info) if hasattr(probe, "feature_info") else 5
            idx = tuple(i % n_stages for i in out_indices)
            self.model = timm.create_model(name, pretrained=use_timm, features_only=True, out_indices=idx,
                                           output_stride=output_stride)
            self.channels = list(self.model.feature_info.channels())
            self.stride = int(self.model.feature_info.reduction()[-1])
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        if is_weights_file(pretrained):
            load_weights(self.model, pretrained, name)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if self.is_vit:
            return list(self.model.forward_intermediates(pixels, indices=self.indices, output_fmt="NCHW",
                                                         intermediates_only=True))
        return list(self.model(pixels))

    def forward_with_cls(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        if not self.is_vit:
            raise ValueError("a CNN backbone has no class token; use a ViT")
        out = self.model.forward_intermediates(pixels, indices=self.indices, output_fmt="NCHW",
                                               intermediates_only=True, return_prefix_tokens=True)
        return [m for m, _ in out], out[-1][1][:, 0]

    def attention_blocks(self) -> list[nn.Module]:
        if not self.is_vit:
            return super().attention_blocks()
        return [blk.attn for blk in self.model.blocks]

    def attention_probs(self, attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
        b, s, _ = y.shape
        q, k, _ = attn.qkv(y).reshape(b, s, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q @ k.transpose(-2, -1)).float() * attn.scale).softmax(-1).mean(1)


class OpenClipBackbone(Backbone):
    """The visual tower of an open_clip ViT: patch tokens of the chosen blocks reshaped to the grid,
    the positional embedding resized to each input's grid (input padded to the patch size)."""

    def __init__(self, name: str, pretrained: WeightsSource = None, out_indices: Sequence[int] = (-1,)) -> None:
        super().__init__()
        model, _ = create_clip(name, pretrained)
        v = model.visual
        if not hasattr(v, "transformer") or not hasattr(v, "conv1"):
            raise ValueError(f"{name}: the open_clip backbone needs a ViT image tower (visual.conv1 + transformer)")
        depth = len(v.transformer.resblocks)
        self.indices = sorted(i % depth for i in out_indices)
        # only what the tokens go through (DDP wants every parameter in the loss): no ln_post / proj / head
        self.conv1, self.ln_pre = v.conv1, v.ln_pre
        self.class_embedding, self.positional_embedding = v.class_embedding, v.positional_embedding
        self.blocks = nn.ModuleList(list(v.transformer.resblocks)[: self.indices[-1] + 1])
        width = int(v.conv1.out_channels)
        self.channels = [width] * len(self.indices)
        self.patch_size = self.stride = int(v.conv1.kernel_size[0])
        self.base_grid = tuple(int(g) for g in v.grid_size)
        self.mean = tuple(getattr(v, "image_mean", None) or OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(v, "image_std", None) or OPENAI_DATASET_STD)
        self.train()

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_with_cls(pixels)[0]

    def forward_with_cls(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.conv1(pad_to_multiple(pixels, self.patch_size).to(self.conv1.weight.dtype))
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
        x = self.ln_pre(x + resize_pos_embed(self.positional_embedding, self.base_grid, (gh, gw)).to(x.dtype))
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.indices:
                out.append(x[:, 1:].transpose(1, 2).reshape(b, d, gh, gw))
        return out, x[:, 0]

    def attention_blocks(self) -> list[nn.Module]:
        return [blk.attn for blk in self.blocks]

    def attention_probs(self, attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
        b, s, d = y.shape
        heads = attn.num_heads
        q, k = F.linear(y, attn.in_proj_weight[: 2 * d], attn.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        q, k = (t.view(b, s, heads, d // heads).transpose(1, 2) for t in (q, k))
        return ((q @ k.transpose(-1, -2)).float() * (d // heads) ** -0.5).softmax(-1).mean(1)


def check_backbone_name(name: str) -> None:
    """``name`` is one :func:`create_backbone` can build (a timm model, or ``open_clip:`` + an open_clip
    model or config); else a ValueError naming the known names (and timm's closest ones)."""
    if name.startswith(OPEN_CLIP_PREFIX):
        check_clip_name(name[len(OPEN_CLIP_PREFIX):])
        return
    import difflib

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}; give a name from timm.list_models(), or "
                         "open_clip:<an open_clip model, a model-config JSON path or a packaged config>")


def create_backbone(name: str, pretrained: WeightsSource = None, *, output_stride: int = 16,
                    out_indices: Sequence[int] = (-1,)) -> Backbone:
    """A timm model by name, or an open_clip visual tower as ``open_clip:<name or config JSON>``.

    Args:
        pretrained: ``none`` (random), a weights file (path/bytes), ``timm``/``true`` (timm's own
            pretrained weights) or an open_clip tag (``openai``) for ``open_clip:`` names.
        output_stride: CNNs only (8 or 16: the last stages dilated, DeepLab-style).
        out_indices: which stages (CNN) or blocks (ViT) to return, negative from the end.
    """
    if name.startswith(OPEN_CLIP_PREFIX):
        return OpenClipBackbone(name[len(OPEN_CLIP_PREFIX):], pretrained, out_indices)
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("true", "timm"):
        pretrained = "timm"
    return TimmBackbone(name, pretrained, output_stride, out_indices)

"""Networks and their weights: the CLIP ViT of CLIP-ES, shared backbones, weights loading."""

from wsss_core.models.backbones import Backbone, create_backbone, resize_pos_embed
from wsss_core.models.clip import ClipViT, create_clip

__all__ = ["Backbone", "ClipViT", "create_backbone", "create_clip", "resize_pos_embed"]

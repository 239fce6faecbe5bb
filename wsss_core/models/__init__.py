"""Networks and their weights: the CLIP ViT of CLIP-ES, shared backbones, the segmenter, ToCo, weights."""

from wsss_core.models.backbones import Backbone, create_backbone, resize_pos_embed
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.models.toco import ToCo, create_toco

__all__ = ["Backbone", "ClipViT", "ToCo", "create_backbone", "create_clip", "create_toco", "resize_pos_embed"]

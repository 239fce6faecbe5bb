"""Networks and their weights: the CLIP ViT of CLIP-ES, shared backbones, the segmenter, ToCo, AffinityNet,
weights."""

from wsss_core.models.affinitynet import AffinityNet, create_affinitynet
from wsss_core.models.backbones import Backbone, create_backbone
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.models.grid import resize_pos_embed
from wsss_core.models.toco import ToCo, create_toco

__all__ = ["AffinityNet", "Backbone", "ClipViT", "ToCo", "create_affinitynet", "create_backbone", "create_clip", "create_toco", "resize_pos_embed"]

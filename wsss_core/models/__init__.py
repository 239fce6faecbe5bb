"""Networks and their weights: the CLIP ViT of CLIP-ES, shared backbones, the segmenter, ToCo, AffinityNet,
weights; ``create_network`` / ``network_from_state``: the one door to the trained networks (``networks``)."""

from wsss_core.models.affinitynet import AffinityNet, create_affinitynet
from wsss_core.models.backbones import Backbone, create_backbone
from wsss_core.models.clip import ClipViT, create_clip
from wsss_core.models.grid import resize_pos_embed
from wsss_core.models.networks import create_network, network_from_state
from wsss_core.models.toco import ToCo, create_toco

__all__ = ["AffinityNet", "Backbone", "ClipViT", "ToCo", "create_affinitynet", "create_backbone", "create_clip", "create_network", "create_toco", "network_from_state", "resize_pos_embed"]

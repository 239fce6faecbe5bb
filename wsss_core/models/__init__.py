"""Backbones: open_clip ViT for CLIP-ES."""

from wsss_core.models.clip import ClipViT, create_clip

__all__ = ["ClipViT", "create_clip"]

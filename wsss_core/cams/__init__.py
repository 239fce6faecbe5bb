"""CAM sources."""

from wsss_core.cams.softmax_gradcam import softmax_gradcam

__all__ = ["softmax_gradcam"]

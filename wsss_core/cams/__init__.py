"""CAM sources, each registered by name (:data:`wsss_core.registry.CAM_SOURCES`)."""

from wsss_core.cams.clip_es import ClipES
from wsss_core.cams.gradcam import ClipGradCAM, gradcam
from wsss_core.cams.softmax_gradcam import softmax_gradcam

__all__ = ["ClipES", "ClipGradCAM", "gradcam", "softmax_gradcam"]

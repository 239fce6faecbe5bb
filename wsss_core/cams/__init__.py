"""CAM sources, each registered by name (:data:`wsss_core.registry.CAM_SOURCES`)."""

from wsss_core.cams.clip_es import ClipES
from wsss_core.cams.gradcam import ClipGradCAM, gradcam
from wsss_core.cams.softmax_gradcam import softmax_gradcam
from wsss_core.cams.toco_cam import toco_cam
from wsss_core.cams.toco_source import ToCoCams, ToCoSegmentation

__all__ = ["ClipES", "ClipGradCAM", "ToCoCams", "ToCoSegmentation", "gradcam", "softmax_gradcam", "toco_cam"]

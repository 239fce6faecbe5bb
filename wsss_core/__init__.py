"""wsss_core: the science of weakly-supervised semantic segmentation as a plain torch library.

No Ray, MLflow, Optuna or fsspec in here (a test checks it). Modules, one concept each:
``types`` (the CamSource / Refiner contracts, CamOutput, PseudoMask), ``registry`` (CAM sources
and refiners by name, ``create_cam_source``/``create_refiner``, ``check_pipeline``), ``pipeline``
(any source × any refiners -> pseudo mask + confidence), ``maps`` (normalise, upsample, pad, group
by size), ``masks`` (background rules, argmax, confidence), ``classes``, ``prompts``, ``metrics``;
``cams.*`` (``clip_es``: Softmax-GradCAM on CLIP, ``gradcam``), ``refine.*`` (``caa``, ``crf``),
``models.*`` (``clip``: the CLIP ViT, ``backbones``: timm / open_clip towers, ``weights``,
``segmenter``: DeepLab-style ASPP / LargeFOV), ``losses`` (``cgl_loss``), ``inference``
(multi-scale + flip).
"""

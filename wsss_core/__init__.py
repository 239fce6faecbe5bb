"""wsss_core: the science of weakly-supervised semantic segmentation as a plain torch library.

No Ray, MLflow, Optuna or fsspec in here (a test checks it). Modules, one concept each:
``classes`` (class lists, palette), ``prompts`` (templates, synonym fusion, sharpness),
``models.clip`` (open_clip ViT with variable image size), ``cams.softmax_gradcam``,
``refine.caa`` (sinkhorn, box_mask, caa), ``refine.crf``, ``masks`` (background rules,
confidence_mask), ``metrics`` (ConfusionMatrix), ``clip_es`` (the batch call).
"""

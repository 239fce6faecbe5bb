"""Text prompts for CLIP-ES: templates, sentence-level synonym fusion, background classes, sharpness."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wsss_core.classes import ClassSet

DEFAULT_TEMPLATE = "a clean origami {}."


@dataclass(frozen=True)
class PromptSet:
    """What the text encoder sees: one sentence per foreground class, one per background class.

    Attributes:
        template: a format string with one ``{}`` slot, e.g. ``"a clean origami {}."``.
        foreground: C sentences, label order 1..C.
        background: the background sentences (may be empty).
    """

    template: str
    foreground: tuple[str, ...]
    background: tuple[str, ...]


def build_prompts(classes: ClassSet, template: str = DEFAULT_TEMPLATE, fuse_synonyms: bool = True,
                  use_background: bool = True, background: Sequence[str] | None = None) -> PromptSet:
    """Fill ``template`` with each class (its fused synonyms when ``fuse_synonyms``) and each
    background name (``background`` overrides the class set's own list)."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must hold exactly one '{{}}' slot: {template!r}")
    fg = tuple(template.format(classes.text(n, fuse_synonyms)) for n in classes.names)
    bg_names = tuple(background) if background is not None else classes.background
    bg = tuple(template.format(b) for b in bg_names) if use_background else ()
    return PromptSet(template, fg, bg)


class TextFeatureCache:
    """Text features computed once per (model, prompt set)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, PromptSet], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, encoder, prompts: PromptSet) -> tuple[torch.Tensor, torch.Tensor]:
        """(foreground [C, E], background [n_bg, E]) L2-normalised features."""
        key = (id(encoder), prompts)
        if key not in self._cache:
            feats = encoder.encode_text(list(prompts.foreground) + list(prompts.background))
            self._cache[key] = (feats[: len(prompts.foreground)], feats[len(prompts.foreground):])
        return self._cache[key]


def sharpness(scores: Sequence[torch.Tensor]) -> float:
    """Label-free prompt quality (CLIP-ES): ``sum_i var(s_i) / sum_i mean(s_i)``; lower is better.

    Args:
        scores: per image, the softmax scores of its present classes, 1-D [K_i]. Variance is the
            population variance (a single present class contributes 0).
    """
    if not scores:
        raise ValueError("sharpness needs at least one image's scores")
    var = sum(float(s.double().var(unbiased=False)) if s.numel() > 1 else 0.0 for s in scores)
    mean = sum(float(s.double().mean()) for s in scores)
    return var / mean

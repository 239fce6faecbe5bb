"""Registries of CAM sources and refiners, with factories in the manner of timm's ``create_model``.

    source = create_cam_source("clip_es", clip=vit, prompts=prompts)
    caa = create_refiner("caa", attn_layers=8, box_threshold=0.4)
    check_pipeline("clip_es", ["caa", "crf"])   # from the names alone, before anything is built

A registered object is a class (or a factory) whose class attributes declare what it provides or
needs (:mod:`wsss_core.types`). The built-in methods register themselves when their modules are
imported; :func:`_builtins` imports them on first use, so a new method is one module plus one
import line in its package's ``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from wsss_core.types import aux_kind

F = TypeVar("F", bound=Callable[..., Any])
BUILTIN_PACKAGES = ("wsss_core.cams", "wsss_core.refine", "wsss_core.regions")


class Registry:
    """A named set of factories; unknown and duplicate names fail with the known names listed."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(obj: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[self.known(name)]
        except ValueError as e:
            raise KeyError(str(e)) from None

    def known(self, name: str) -> str:
        """``name`` when registered (for config validators); else ValueError listing the known names."""
        _builtins()
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}")
        return name

    def names(self) -> list[str]:
        _builtins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _builtins()
        return name in self._items


CAM_SOURCES = Registry("CAM source")
REFINERS = Registry("refiner")
PROPOSERS = Registry("region proposer")


def _builtins() -> None:
    for pkg in BUILTIN_PACKAGES:
        importlib.import_module(pkg)  # a no-op after the first time


def create_cam_source(name: str, **kwargs: Any) -> Any:
    """The CAM source registered as ``name``, built with ``kwargs``."""
    return CAM_SOURCES.get(name)(**kwargs)


def create_refiner(name: str, **kwargs: Any) -> Any:
    """The refiner registered as ``name``, built with ``kwargs``."""
    return REFINERS.get(name)(**kwargs)


def create_proposer(name: str, **kwargs: Any) -> Any:
    """The region proposer registered as ``name`` (:mod:`wsss_core.regions`), built with ``kwargs``."""
    return PROPOSERS.get(name)(**kwargs)


def check_pipeline(source: str, refiners: Sequence[str]) -> None:
    """Refuse a pairing that cannot run, naming the source and the refiner.

    Raises:
        ValueError: an unknown name; a refiner needing aux the source does not provide; a
            ``cams`` refiner after a ``probs`` one (CAMs are gone once probabilities exist);
            a refiner listed twice.
    """
    src = CAM_SOURCES.get(source)
    provides = frozenset(getattr(src, "provides", frozenset()))
    seen_probs = None
    for i, name in enumerate(refiners):
        ref = REFINERS.get(name)
        if name in refiners[:i]:
            raise ValueError(f"refiner {name!r} is listed twice in refine={list(refiners)}")
        missing = sorted(frozenset(ref.needs) - {aux_kind(k) for k in provides})
        if missing:
            able = [s for s in CAM_SOURCES.names() if frozenset(ref.needs) <= set(getattr(CAM_SOURCES.get(s), "provides", ()))]
            raise ValueError(f"refiner {name!r} needs {', '.join(missing)} from the CAM source, and CAM source "
                             f"{source!r} does not provide it (it provides: {', '.join(sorted(provides)) or 'nothing'}); "
                             f"sources that can feed {name!r}: {', '.join(able) or 'none'}")
        if ref.space == "cams" and seen_probs:
            raise ValueError(f"refiner {name!r} works on CAMs and must come before {seen_probs!r}, which works on "
                             f"probabilities: e.g. refine={[n for n in refiners if n != seen_probs] + [seen_probs]}")
        if ref.space == "probs":
            seen_probs = seen_probs or name

"""The sweep's typed config and its search space.

A search space maps labeling-config keys (``caa.t``, ``text.template``, ...) to Optuna-style
declarations::

    caa.box_threshold: {low: 0.2, high: 0.8}            # float (uniform)
    mask.bg_value:     {low: 0.5, high: 4, log: true}   # float (log-uniform)
    caa.t:             {low: 1, high: 4}                 # int: the labeling field is an int
    text.template:     {choices: ["a photo of a {}.", "a clean origami {}."]}
    cam_source:        {choices: [clip_es, ...]}       # registered CAM sources
    refine:            {choices: [[caa], [caa, crf]]}
    mask.bg_value:                                       # conditional on mask.bg_rule
      threshold: {low: 0.3, high: 0.7}
      power: {low: 0.5, high: 4, log: true}

Every declaration is checked against the labeling config before any trial starts (each bound and
each choice must be a valid value of that key), so a typo fails in a second, naming the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from wsss_core.registry import REFINERS
from wsss_platform.config import ConfigError, Section, apply_overrides, build_config, read_yaml
from wsss_platform.label.config import REPLACED, LabelConfig
from wsss_platform.train.config import TrainConfig


def sweepable_keys() -> list[str]:
    """Keys a sweep may search: the CAM source, the refiner list, the prompts, the mask settings and
    every setting of a registered refiner's section. What a trial then costs follows from the
    caches: a new source setting (source, prompts) reruns the source's second stage or all of it;
    the rest reuses the cached CAMs and aux and runs no network."""
    keys = ["cam_source", "refine", "text.template", "text.fuse_synonyms", "text.use_background"]
    for section in ("mask", *(name for name in REFINERS.names() if name in LabelConfig.model_fields)):
        keys += _section_keys(section, LabelConfig.model_fields[section].annotation)
    return keys


def _section_keys(prefix: str, section: Any) -> list[str]:
    """Every leaf key of a section, sub-sections included (``regions.felzenszwalb.scale``)."""
    keys = []
    for name, field in section.model_fields.items():
        sub = field.annotation
        keys += _section_keys(f"{prefix}.{name}", sub) if isinstance(sub, type) and issubclass(sub, Section) \
            else [f"{prefix}.{name}"]
    return keys


REFINE_SEP = "+"  # refine: [caa, crf] is the choice "caa+crf" for Optuna, whose choices are scalars


BG_RULES = ("threshold", "power")
CONDITIONAL_SEP = ":"  # "mask.bg_value:power": the bg_value drawn when the rule is power


class SubsetConfig(Section):
    num_images: int = Field(64, ge=1)
    """Images of the split every trial is scored on (a seeded sample, in dataset order)."""
    seed: int = 0


class TuneSection(Section):
    num_trials: int = Field(20, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    """Stop starting trials after this many seconds (running ones finish)."""
    seed: int = 0
    """Seed of Optuna's TPE sampler (same seed + same results = same proposals)."""
    startup_trials: int = Field(10, ge=1)
    """Random trials before TPE starts modelling."""
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float | Literal["auto"] = "auto"
    """auto: share the cluster's GPUs among the concurrent trials (fractions allowed), 0 without GPUs."""
    early_stopping: bool = True
    """ASHA over the intermediate mIoU reported after each chunk of the subset."""
    report_chunks: int = Field(4, ge=1)
    """Intermediate results per trial (each adds the next chunk of the subset)."""


class SweepTracking(Section):
    enabled: bool = True
    experiment: str = "wsss-sweep"
    run_name: str | None = None


class SweepConfig(Section):
    label: LabelConfig = LabelConfig()
    """The labeling config being tuned (inline, or a path to its YAML in the file)."""
    train: TrainConfig | None = None
    """A training config instead (inline, or a path): each trial trains a segmenter on Ray Train and
    reports its val mIoU; the search space then holds ``train.*`` / ``model.*`` keys."""
    objective: Literal["miou", "sharpness"] = "miou"
    """miou: pseudo-mask mIoU on the subset (needs ground truth; maximised). sharpness: label-free
    prompt score of the CLIP sources (minimised)."""
    subset: SubsetConfig = SubsetConfig()
    search_space: dict[str, Any] = Field(default_factory=dict)
    tune: TuneSection = TuneSection()
    output: str = "sweep-output"
    tracking: SweepTracking = SweepTracking()
    overwrite: bool = False
    """Start over in an output that holds a sweep (its cache, trials and results are removed)."""
    ray_address: str | None = None

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.objective == "miou" else "min"

    @property
    def job(self) -> LabelConfig | TrainConfig:
        """The config whose settings the trials vary."""
        return self.train if self.train is not None else self.label

    @property
    def storage(self):
        return self.job.dataset.storage

    @model_validator(mode="after")
    def _training_objective(self) -> SweepConfig:
        if self.train is not None and self.objective != "miou":
            raise ValueError("objective: a training sweep scores val mIoU (miou); sharpness is for labeling sweeps")
        return self


@dataclass(frozen=True)
class Dim:
    """One Optuna distribution: ``choices`` (categorical) or ``low``/``high`` (int or float)."""

    name: str
    kind: Literal["categorical", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    @property
    def key(self) -> str:
        """The labeling-config key this dimension sets."""
        return self.name.split(CONDITIONAL_SEP, 1)[0]

    @property
    def when(self) -> str | None:
        """The background rule a conditional dimension belongs to."""
        return self.name.split(CONDITIONAL_SEP, 1)[1] if CONDITIONAL_SEP in self.name else None


def _field_type(key: str, cls: type[Section] = LabelConfig) -> type:
    *sections, name = key.split(".")
    for section in sections:  # down the sub-sections (regions.felzenszwalb.scale)
        cls = cls.model_fields[section].annotation  # type: ignore[assignment]
    return cls.model_fields[name].annotation  # type: ignore[return-value]


def _check_value(base: dict[str, Any], key: str, value: Any, what: str, extra: dict[str, Any] | None = None,
                 cls: type[Section] = LabelConfig) -> None:
    """Raise ConfigError naming ``key`` unless the swept config (``cls``) accepts ``value`` there."""
    overrides = {key: value, **(extra or {})}
    data = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    try:
        build_config(cls, data, source=cls.__name__)
    except ConfigError as e:
        detail = str(e).split("\n", 1)[-1].strip()
        raise ConfigError(f"search_space.{key}: {what} {value!r} is not a valid value: {detail}") from None


def _parse_dim(base: dict[str, Any], name: str, decl: Any, extra: dict[str, Any] | None = None,
               cls: type[Section] = LabelConfig) -> Dim:
    key = name.split(CONDITIONAL_SEP, 1)[0]
    where = f"search_space.{key}" + (f".{name.split(CONDITIONAL_SEP)[1]}" if CONDITIONAL_SEP in name else "")
    if not isinstance(decl, dict):
        raise ConfigError(f"{where}: expected a mapping like {{choices: [...]}} or {{low: .., high: ..}}, got {decl!r}")
    allowed = {"choices", "low", "high", "log", "step"}
    if unknown := set(decl) - allowed:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; use choices, or low/high with optional log/step")
    if "choices" in decl:
        if set(decl) - {"choices"}:
            raise ConfigError(f"{where}: give either choices or low/high, not both")
        choices = decl["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
        for c in choices:
            lists = key == "refine" and isinstance(c, list) and all(isinstance(x, str) for x in c)
            if c is not None and not isinstance(c, bool | int | float | str) and not lists:
                raise ConfigError(f"{where}: choice {c!r} must be a string, number, boolean or null"
                                  + (" (refine: lists of refiner names)" if key == "refine" else ""))
            _check_value(base, key, c, "choice", extra, cls)
        if key == "refine":
            choices = [REFINE_SEP.join(c) if isinstance(c, list) else c for c in choices]
        if len(set(map(json.dumps, choices))) != len(choices):
            raise ConfigError(f"{where}: choices repeat a value: {choices!r}")
        return Dim(name, "categorical", tuple(choices))
    if "low" not in decl or "high" not in decl:
        raise ConfigError(f"{where}: a range needs both low and high (or use choices: [...])")
    ftype = _field_type(key, cls)
    if ftype in (bool, str) or getattr(ftype, "__origin__", None) in (Literal, list):
        raise ConfigError(f"{where}: {key} is not numeric; declare it with choices: [...]")
    low, high, log, step = decl["low"], decl["high"], bool(decl.get("log", False)), decl.get("step")
    for bound, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{where}: {bound} must be a number, got {v!r}")
    if low > high:
        raise ConfigError(f"{where}: low ({low}) > high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got {low}")
    if log and step is not None:
        raise ConfigError(f"{where}: step cannot be combined with log scale")
    kind: Literal["int", "float"] = "int" if ftype is int else "float"
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: {key} is an integer; low and high must be integers, got {low}, {high}")
    if step is not None and (not isinstance(step, int | float) or step <= 0):
        raise ConfigError(f"{where}: step must be a positive number, got {step!r}")
    for bound, v in (("low", low), ("high", high)):
        _check_value(base, key, int(v) if kind == "int" else float(v), f"{bound} bound", extra, cls)
    return Dim(name, kind, (), float(low), float(high), log, None if step is None else float(step))


def parse_search_space(space: dict[str, Any], label: LabelConfig) -> list[Dim]:
    """Validate the declarations against the labeling config; returns the dimensions in sampling
    order (``mask.bg_rule`` before the ``mask.bg_value`` that depends on it).

    Raises:
        ConfigError: naming the key, for an unknown key, an empty choice list, ``low > high``, a
            bound or choice the labeling config rejects, or a malformed declaration.
    """
    if not space:
        raise ConfigError("search_space is empty: declare at least one key, e.g. caa.t: {low: 1, high: 4}")
    base = label.model_dump(mode="json")
    keys = sweepable_keys()
    for key in space:
        if key not in keys:
            replaced = REPLACED.get(tuple(key.split(".", 1)))  # type: ignore[arg-type]
            hint = f" ({replaced}; search it as refine: {{choices: [[caa], [caa, crf]]}})" if replaced else ""
            raise ConfigError(f"search_space.{key}: unknown key{hint}; sweepable keys: {', '.join(keys)}")
    dims: list[Dim] = []
    rule_dim = None
    if "mask.bg_rule" in space:
        rule_dim = _parse_dim(base, "mask.bg_rule", space["mask.bg_rule"])
        if rule_dim.kind != "categorical":
            raise ConfigError("search_space.mask.bg_rule: declare it with choices: [threshold, power]")
        dims.append(rule_dim)
    rules = list(rule_dim.choices) if rule_dim else [label.mask.bg_rule]
    for key, decl in space.items():
        if key == "mask.bg_rule":
            continue
        if key == "mask.bg_value" and isinstance(decl, dict) and set(decl) and set(decl) <= set(BG_RULES):
            missing = [r for r in rules if r not in decl]
            if missing:
                raise ConfigError(f"search_space.mask.bg_value: no range for rule(s) {missing} that mask.bg_rule can take")
            dims += [_parse_dim(base, f"{key}{CONDITIONAL_SEP}{r}", decl[r], {"mask.bg_rule": r}) for r in rules]
            continue
        extra = {"mask.bg_rule": rules[0]} if key == "mask.bg_value" and len(rules) == 1 else None
        dim = _parse_dim(base, key, decl, extra)
        if key == "mask.bg_value" and len(rules) > 1:
            for r in rules:  # one range for every rule: it must suit each
                for v in (dim.choices or (dim.low, dim.high)):
                    _check_value(base, key, v, f"value for rule {r}:", {"mask.bg_rule": r})
        dims.append(dim)
    _check_refiners_run(space, label, next((d for d in dims if d.name == "refine"), None))
    return dims


def _check_refiners_run(space: dict[str, Any], label: LabelConfig, refine: Dim | None) -> None:
    """A refiner's key searched while no trial runs that refiner gives trials that differ in nothing.

    ``refine``: the parsed ``refine`` dimension (its choices joined by ``REFINE_SEP``), if searched."""
    from wsss_core.registry import REFINERS

    lists = [c.split(REFINE_SEP) for c in refine.choices] if refine else [label.refine]
    used = {name for names in lists for name in names}
    for key in space:
        section = key.split(".", 1)[0]
        if section in REFINERS and section not in used:
            raise ConfigError(f"search_space.{key}: no trial runs {section} (label.refine is {label.refine}): add it "
                              f"to label.refine, or search refine lists that include it")


def train_sweepable_keys() -> list[str]:
    """Keys a training sweep may search: the schedule (not where labels come from or what is scored)
    and the model's head and weights."""
    fixed = {"pseudo_masks", "val_split", "iterations", "checkpoint_every", "eval_every", "eval_scales", "eval_flip"}
    return [f"train.{k}" for k in TrainConfig.model_fields["train"].annotation.model_fields if k not in fixed] + [  # type: ignore[union-attr]
        "model.head", "model.pretrained", "model.output_stride"]


def parse_train_space(space: dict[str, Any], train: TrainConfig) -> list[Dim]:
    """Validate a training sweep's declarations against the training config (as for labeling)."""
    if not space:
        raise ConfigError("search_space is empty: declare at least one key, e.g. train.mu: {low: 0.8, high: 0.98}")
    keys = train_sweepable_keys()
    for key in space:
        if key not in keys:
            raise ConfigError(f"search_space.{key}: not a sweepable training key; sweepable keys: {', '.join(keys)}")
    base = train.model_dump(mode="json")
    return [_parse_dim(base, key, decl, None, TrainConfig) for key, decl in space.items()]


def resolve_params(params: dict[str, Any], base_rule: str) -> dict[str, Any]:
    """A trial's params as labeling-config keys: ``mask.bg_value:power`` -> ``mask.bg_value`` when the
    trial's rule is power (the other rule's value, if present, is dropped)."""
    rule = params.get("mask.bg_rule", base_rule)
    out = {}
    for name, value in params.items():
        key, _, when = name.partition(CONDITIONAL_SEP)
        if not when or when == rule:
            out[key] = value
    if isinstance(out.get("refine"), str):
        out["refine"] = [r for r in out["refine"].split(REFINE_SEP) if r]
    return out


def apply_params(label: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The labeling config (as a dict) with a trial's params set."""
    base_rule = label.get("mask", {}).get("bg_rule", "threshold")
    overrides = resolve_params(params, base_rule)
    return apply_overrides(label, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def read_sweep_yaml(path: str | Path) -> dict[str, Any]:
    """The sweep file with ``label: FILE`` (or ``train: FILE``) replaced by that file's contents
    (relative to the working folder, else to the sweep file's folder)."""
    data = read_yaml(path)
    for section, what in (("label", "labeling"), ("train", "training")):
        ref = data.get(section)
        if not isinstance(ref, str):
            continue
        if "://" in ref:
            data[section] = read_yaml(ref)
            continue
        found = next((p for p in (Path(ref), Path(path).parent / ref) if p.is_file()), None)
        if found is None:
            raise ConfigError(f"{section}: {what} config {ref!r} not found (looked in {os.getcwd()} and "
                              f"{Path(path).parent})")
        data[section] = read_yaml(found)
    return data


def load_sweep_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[SweepConfig, list[Dim]]:
    """Load, override, validate; the search space is checked here, before Ray starts."""
    data = read_sweep_yaml(path) if path else {}
    cfg = build_config(SweepConfig, data, overrides, source=str(path) if path else "defaults + overrides")
    if cfg.train is not None:
        return cfg, parse_train_space(cfg.search_space, cfg.train)
    return cfg, parse_search_space(cfg.search_space, cfg.label)

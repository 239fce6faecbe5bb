"""Typed configs: pydantic models loaded from YAML, overridden with ``key.sub=value``.

Every error names the offending key (``caa.t: Input should be greater than or equal to 1``),
so a typo in a 40-line YAML costs seconds, not a failed cluster job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from wsss_platform import storage
from wsss_platform.section import Section as Section  # every section's base, imported from here

T = TypeVar("T", bound=BaseModel)

SECRET_FIELDS = frozenset({"key", "secret", "token", "session_token", "password"})
"""Config fields whose values are never printed (storage credentials)."""
MASK = "***"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


def shown_override(item: str) -> str:
    """An override as it may be printed: a secret field's value masked."""
    key, sep, _ = item.partition("=")
    return f"{key}={MASK}" if sep and key.strip().split(".")[-1] in SECRET_FIELDS else item


def is_secret_override(item: str) -> bool:
    return shown_override(item) != item


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=0.5"`` -> (["a", "b"], 0.5); the value is parsed as YAML (``[1,2]``, ``null``, ``true``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {shown_override(item)!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set (nested dicts created)."""
    out: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {shown_override(item)!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def mask_secrets(value: Any, field: str | None = None) -> Any:
    """``value`` with every secret field's value replaced by ``***`` (for messages and logs)."""
    if field in SECRET_FIELDS and value is not None:
        return MASK
    if isinstance(value, dict):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_secrets(v) for v in value)
    return value


def _section(cls: type[BaseModel] | None, path: tuple) -> type[BaseModel] | None:
    """The config section (model class) at ``path`` below ``cls``, or None."""
    for part in path:
        field = cls.model_fields.get(str(part)) if cls is not None else None
        ann = field.annotation if field is not None else None
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return cls


def all_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config class (sections expanded)."""
    keys = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += all_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def suggest(cls: type[BaseModel] | None, loc: tuple) -> str:
    """`` (did you mean mask.bg_value?)`` for an unknown key, or the section prefix it lacks."""
    import difflib

    if cls is None:
        return ""
    key = ".".join(str(p) for p in loc)
    section = _section(cls, loc[:-1])
    names = list(section.model_fields) if section is not None else []
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)"
    # A key of a nested section given at the top (`model.name` in a sweep: `label.model.name`).
    for full in all_keys(cls):
        if full.endswith("." + key) or full.endswith("." + str(loc[0])) or f".{loc[0]}." in f".{full}":
            head = full[: full.index(str(loc[0]))] if str(loc[0]) in full else ""
            if head:
                return f" (did you mean {head}{key}?)"
    close = difflib.get_close_matches(key, all_keys(cls), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def format_validation_error(err: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config ({source}):"]
    # include_input=False: pydantic's own message may quote the input; ours masks it first.
    for e in err.errors(include_url=False):
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        secret = any(str(p) in SECRET_FIELDS for p in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + (suggest(cls, tuple(e["loc"])) or " (check the spelling; see the example configs in jobs/configs/)")
        elif "input" in e and e["type"] not in ("missing",) and key:  # a whole-config check names its keys itself
            shown = MASK if secret else mask_secrets(e["input"])
            msg = f"{msg} (got {shown!r})" if shown != MASK else f"{msg} (got {MASK})"
        lines.append(f"  {key}: {msg}" if key else f"  {msg}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a local file or a URI (``s3://…/best.yaml``)."""
    p = Path(path)
    if "://" in str(path):
        try:
            text = storage.read_text(str(path))
        except storage.StorageError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    elif not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    else:
        text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def build_config(cls: type[T], data: dict[str, Any], overrides: list[str] | None = None,
                 source: str = "config") -> T:
    """Validate ``data`` (plus overrides) as ``cls``; raises ConfigError naming each bad key."""
    merged = apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, cls)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or its defaults when ``path`` is None) and apply overrides."""
    data = read_yaml(path) if path else {}
    return build_config(cls, data, overrides, source=str(path) if path else "defaults + overrides")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

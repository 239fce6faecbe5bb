from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from wsss_platform.config import ConfigError, Section, apply_overrides, build_config, load_config


class Inner(Section):
    t: int = Field(2, ge=1)
    rule: Literal["threshold", "power"] = "threshold"


class Cfg(Section):
    name: str = "x"
    inner: Inner = Inner()
    values: list[float] = Field(default_factory=lambda: [1.0])


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  t: 3\n")
    cfg = load_config(Cfg, p, ["inner.rule=power", "values=[0.5, 2]", "name=b"])
    assert (cfg.name, cfg.inner.t, cfg.inner.rule, cfg.values) == ("b", 3, "power", [0.5, 2.0])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=null"]) == {"a": {"b": 1, "c": None}}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("inner.tt=3", "inner.tt: unknown key"),
        ("inner.t=abc", "inner.t: Input should be a valid integer"),
        ("inner.t=0", "inner.t: Input should be greater than or equal to 1"),
        ("inner.rule=cubic", "inner.rule: Input should be 'threshold' or 'power'"),
        ("nokey", "not of the form key.sub=value"),
        ("name.x=1", "name is not a section"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        build_config(Cfg, {"name": "n"}, [override])
    assert needle in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Cfg, tmp_path / "list.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[2] / "jobs" / "configs").glob("*.yaml")))
def test_example_configs_load(name, monkeypatch):
    """Every shipped example config validates (sweeps: with their search space)."""
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.sweep.config import load_sweep_config

    root = Path(__file__).parents[2]
    monkeypatch.chdir(root)
    path = root / "jobs" / "configs" / name
    if "sweep" in name:
        cfg, dims = load_sweep_config(path)
        assert dims and cfg.label.cam_source == "clip_es"
    else:
        assert load_config(LabelConfig, path).model.name

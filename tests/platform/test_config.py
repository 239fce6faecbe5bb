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
def test_example_configs_load(name, monkeypatch, request):
    """Every shipped example config validates (sweeps: with their search space)."""
    if name.startswith("synthshapes"):
        request.getfixturevalue("synthshapes")  # their model and data paths name ../shared: skipped without it
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.sweep.config import load_sweep_config

    root = Path(__file__).parents[2]
    monkeypatch.chdir(root)
    path = root / "jobs" / "configs" / name
    if "sweep" in name:
        cfg, dims = load_sweep_config(path)
        assert dims and cfg.label.cam_source == "clip_es"
    elif "train" in name:
        from wsss_platform.train.config import TrainConfig

        assert load_config(TrainConfig, path).model.backbone
    elif "toco" in name or "affinity" in name:
        from wsss_platform.train.config import AffinityConfig, ToCoConfig

        assert load_config(ToCoConfig if "toco" in name else AffinityConfig, path).model.backbone
    else:
        assert load_config(LabelConfig, path).model.name


def test_label_sections_default_to_the_core_defaults():
    """A refiner's section and the mask section are its factory's keyword arguments: same names, same defaults."""
    import inspect

    from wsss_core.pipeline import PseudoMasker
    from wsss_core.registry import PROPOSERS, REFINERS
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.stages import PROPOSER_INPUTS, REFINER_INPUTS

    cfg = LabelConfig()
    pairs = [(cfg.mask, PseudoMasker)] + [(getattr(cfg, name), REFINERS.get(name)) for name in REFINERS.names()]
    for section, factory in pairs:
        params = {k: p.default for k, p in inspect.signature(factory).parameters.items()
                  if k not in ("refiners", *REFINER_INPUTS)}
        # what the platform supplies: the device beside the section; a checkpoint as a URI in it; a
        # proposer as its name, with each proposer's settings in a sub-section of its name
        assert {k: v for k, v in section.model_dump().items() if k not in REFINER_INPUTS and k not in PROPOSERS} \
            == params, factory
        supplied = set(inspect.signature(factory).parameters) & set(REFINER_INPUTS)
        assert set(section.model_dump()) & set(REFINER_INPUTS) == supplied - {"device"}, factory
    for name in PROPOSERS.names():  # each proposer's sub-section: its factory's arguments and defaults
        params = {k: p.default for k, p in inspect.signature(PROPOSERS.get(name)).parameters.items()
                  if k not in PROPOSER_INPUTS}
        assert {k: v for k, v in getattr(cfg.regions, name).model_dump().items() if k not in PROPOSER_INPUTS} \
            == params, name


@pytest.mark.parametrize(("override", "needle"), [
    ("mask.crf=false", "mask.crf: replaced by the refine list: refine: [caa, crf] (CAA, then the dense CRF) or [caa]"),
    ("caa.enabled=false", "caa.enabled: replaced by the refine list"),
    ("mask.crf_iterations=5", "mask.crf_iterations: moved to crf.iterations"),
    ("refine=caa", "refine: a list of refiner names now, e.g. refine: [caa, crf] or [caa]"),
    ("refine=[crf, caa]", "cam_source=clip_es with refine=['crf', 'caa']: refiner 'caa' works on CAMs and must come before 'crf'"),
    ("cam_source=psa", "cam_source: unknown CAM source 'psa'; known: clip_es, gradcam, toco, toco_seg"),
    ("refine=[caa, pamr]", "refine: unknown refiner(s) ['pamr']; known: caa, crf, par, random_walk, regions"),
])
def test_old_and_impossible_label_configs_fail_naming_the_key(override, needle):
    from wsss_platform.label.config import LabelConfig

    with pytest.raises(ConfigError) as e:
        build_config(LabelConfig, {}, [override])
    assert needle in str(e.value)
    assert build_config(LabelConfig, {}, ["refine=[]"]).refine == []


def test_a_refiner_the_source_cannot_feed_fails_at_validation():
    """Naming both: a CAM source without attention and CAA."""
    from typing import ClassVar

    from wsss_core.registry import CAM_SOURCES
    from wsss_platform.label.config import LabelConfig

    class NoAttention:
        provides: ClassVar[frozenset[str]] = frozenset()

    CAM_SOURCES.register("test_no_attention")(NoAttention)
    try:
        with pytest.raises(ConfigError) as e:
            build_config(LabelConfig, {}, ["cam_source=test_no_attention", "refine=[caa, crf]"])
        assert "refiner 'caa' needs attn from the CAM source, and CAM source 'test_no_attention' does not provide it" in str(e.value)
        assert build_config(LabelConfig, {}, ["cam_source=test_no_attention", "refine=[crf]"]).refine == ["crf"]
    finally:
        del CAM_SOURCES._items["test_no_attention"]


def test_every_refiner_section_defaults_to_the_refiner_s_own_defaults():
    """One place for a method's defaults: the core class; each config section (and the affinity
    schedule's random-walk keys) starts from them."""
    import dataclasses

    from wsss_core.registry import REFINERS
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.train.config import AffinitySchedule

    cfg, checked = LabelConfig(), 0
    for name in REFINERS.names():
        section = getattr(cfg, name, None)
        if section is None:
            continue
        own = {f.name: f.default for f in dataclasses.fields(REFINERS.get(name)) if f.default is not dataclasses.MISSING}
        for key, value in section.model_dump().items():
            if key in own:
                assert value == own[key], f"{name}.{key}: config {value!r}, {REFINERS.get(name).__name__} {own[key]!r}"
                checked += 1
    walk = {f.name: f.default for f in dataclasses.fields(REFINERS.get("random_walk"))}
    for key in ("beta", "t", "alpha", "radius"):
        assert AffinitySchedule.model_fields[key].default == walk[key], key
    assert checked >= 15  # caa 4, crf 6, par 4, random_walk 5

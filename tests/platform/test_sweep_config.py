"""Sweep configs: every bad search-space declaration fails before any trial, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsss_platform.config import ConfigError, build_config
from wsss_platform.label.config import LabelConfig
from wsss_platform.ownership import fingerprint
from wsss_platform.sweep.config import load_sweep_config, parse_search_space, resolve_params
from wsss_platform.sweep.objective import choose_subset
from wsss_platform.sweep.results import best_job_data
from wsss_platform.sweep.state import sweep_settings

LABEL = {"model": {"name": "tiny", "pretrained": "none"}, "refine": ["caa"]}


def write(tmp_path, space, **extra):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"label": LABEL, "search_space": space, "output": str(tmp_path / "out"), **extra}))
    return path


@pytest.mark.parametrize("space, key, words", [
    ({"caa.tt": {"low": 1, "high": 3}}, "search_space.caa.tt", "unknown key"),
    ({"dataset.uri": {"choices": ["a"]}}, "search_space.dataset.uri", "unknown key"),
    ({"text.template": {"choices": []}}, "search_space.text.template", "non-empty list"),
    ({"caa.box_threshold": {"low": 0.8, "high": 0.2}}, "search_space.caa.box_threshold", "low (0.8) > high (0.2)"),
    ({"caa.t": {"low": 1, "high": 20}}, "search_space.caa.t", "less than or equal to 8"),
    ({"caa.t": {"low": 1.5, "high": 3}}, "search_space.caa.t", "integer"),
    ({"mask.mu": {"low": 0.0, "high": 0.9, "log": True}}, "search_space.mask.mu", "log scale needs low > 0"),
    ({"text.template": {"choices": ["no slot here"]}}, "search_space.text.template", "slot"),
    ({"text.template": {"low": 0, "high": 1}}, "search_space.text.template", "not numeric"),
    ({"caa.t": {"low": 1}}, "search_space.caa.t", "both low and high"),
    ({"caa.t": {"low": 1, "high": 2, "stepp": 1}}, "search_space.caa.t", "unknown field"),
    ({"mask.bg_value": {"low": 0.2, "high": 3.0}}, "search_space.mask.bg_value", "threshold must be in (0, 1]"),
    ({"mask.bg_rule": {"choices": ["threshold", "power"]}, "mask.bg_value": {"threshold": {"low": 0.3, "high": 0.7}}},
     "search_space.mask.bg_value", "no range for rule(s) ['power']"),
    ({"mask.bg_rule": {"choices": ["threshold", "ratio"]}}, "search_space.mask.bg_rule", "'ratio'"),
    ({}, "search_space", "empty"),
    ({"mask.crf": {"choices": [True, False]}}, "search_space.mask.crf", "replaced by the refine list"),
    ({"refine": {"choices": [["crf", "caa"]]}}, "search_space.refine", "must come before 'crf'"),
    ({"refine": {"choices": ["caa"]}}, "search_space.refine", "a list of refiner names"),
    ({"cam_source": {"choices": ["clip_es", "psa"]}}, "search_space.cam_source", "unknown CAM source 'psa'"),
    ({"random_walk.beta": {"choices": [8, 32]}}, "search_space.random_walk.beta", "no trial runs random_walk"),
    ({"refine": {"choices": [["caa"], []]}, "crf.iterations": {"choices": [5, 10]}}, "search_space.crf.iterations",
     "search refine lists that include it"),
])
def test_bad_declarations_name_the_key(tmp_path, space, key, words):
    with pytest.raises(ConfigError) as e:
        load_sweep_config(write(tmp_path, space))
    assert key in str(e.value) and words in str(e.value), str(e.value)


def test_cli_rejects_a_bad_space_before_ray_starts(tmp_path):
    path = write(tmp_path, {"caa.box_threshold": {"low": 0.9, "high": 0.1}})
    run = subprocess.run([str(Path(sys.executable).parent / "wsss"), "sweep", "--config", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2
    assert "error: search_space.caa.box_threshold: low (0.9) > high (0.1)" in run.stderr
    assert "Ray" not in run.stdout + run.stderr  # no cluster was started or joined
    assert not (tmp_path / "out").exists()  # no subset, no cache, no trial


def test_good_space_types_follow_the_labeling_fields(tmp_path):
    cfg, dims = load_sweep_config(write(tmp_path, {
        "caa.t": {"low": 1, "high": 4},
        "caa.box_threshold": {"low": 0.2, "high": 0.8, "step": 0.1},
        "text.template": {"choices": ["a photo of a {}.", "a clean origami {}."]},
        "mask.bg_value": {"threshold": {"low": 0.3, "high": 0.7}, "power": {"low": 0.5, "high": 4, "log": True}},
        "mask.bg_rule": {"choices": ["threshold", "power"]},
    }), ["tune.num_trials=3"])
    kinds = {d.name: d.kind for d in dims}
    assert kinds == {"mask.bg_rule": "categorical", "caa.t": "int", "caa.box_threshold": "float",
                     "text.template": "categorical", "mask.bg_value:threshold": "float", "mask.bg_value:power": "float"}
    assert dims[0].name == "mask.bg_rule"  # drawn before the value that depends on it
    assert cfg.tune.num_trials == 3 and cfg.mode == "max"


def test_label_file_reference_and_overrides(tmp_path):
    (tmp_path / "label.yaml").write_text(yaml.safe_dump(LABEL | {"dataset": {"uri": "somewhere"}}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"label": "label.yaml", "objective": "sharpness",
                                    "search_space": {"text.fuse_synonyms": {"choices": [True, False]}}}))
    cfg, _ = load_sweep_config(path, ["label.dataset.uri=/data/voc"])  # found beside the sweep file
    assert cfg.label.dataset.uri == "/data/voc" and cfg.label.model.name == "tiny" and cfg.mode == "min"
    path.write_text(yaml.safe_dump({"label": "missing.yaml", "search_space": {}}))
    with pytest.raises(ConfigError, match=r"label: labeling config 'missing\.yaml' not found"):
        load_sweep_config(path)


def test_params_resolve_to_labeling_keys_and_best_config_loads():
    assert resolve_params({"mask.bg_rule": "power", "mask.bg_value:power": 2.0, "mask.bg_value:threshold": 0.4},
                          "threshold") == {"mask.bg_rule": "power", "mask.bg_value": 2.0}
    assert resolve_params({"mask.bg_value:threshold": 0.4}, "threshold") == {"mask.bg_value": 0.4}
    label = LABEL | {"dataset": {"uri": "s3://b/voc", "storage": {"key": "AKIA", "secret": "s3cr3t"}}}
    from wsss_platform.sweep.config import SweepConfig

    cfg = build_config(SweepConfig, {"label": label})
    best = best_job_data(cfg, {"caa.t": 3, "text.template": "a photo of a {}."})
    assert "key" not in best["dataset"]["storage"] and "secret" not in best["dataset"]["storage"]
    loaded = build_config(LabelConfig, best)
    assert loaded.caa.t == 3 and loaded.text.template == "a photo of a {}." and loaded.model.name == "tiny"
    assert "caa" in best and set(best["caa"]) == {"t"}  # only what was set: defaults stay defaults


def test_fingerprint_and_subset_are_stable():
    from wsss_platform.sweep.config import SweepConfig

    a = build_config(SweepConfig, {"label": LABEL, "search_space": {"caa.t": {"low": 1, "high": 2}}})
    b = build_config(SweepConfig, {"label": LABEL, "search_space": {"caa.t": {"low": 1, "high": 2}},
                                   "overwrite": True, "ray_address": "auto"})
    c = build_config(SweepConfig, {"label": LABEL, "search_space": {"caa.t": {"low": 1, "high": 3}}})
    assert fingerprint(sweep_settings(a)) == fingerprint(sweep_settings(b)) != fingerprint(sweep_settings(c))
    ids = [str(i) for i in range(50)]
    assert choose_subset(ids, 10, 0) == choose_subset(ids, 10, 0) != choose_subset(ids, 10, 1)
    assert choose_subset(ids, 10, 0) == sorted(choose_subset(ids, 10, 0), key=int)  # dataset order
    assert choose_subset(ids, 99, 0) == ids


def test_parse_search_space_checks_values_against_the_label_config():
    label = LabelConfig()
    with pytest.raises(ConfigError, match=r"search_space.caa.attn_layers: high bound 100"):
        parse_search_space({"caa.attn_layers": {"low": 1, "high": 100}}, label)


def test_seeded_searcher_proposes_the_same_trials_and_respects_conditions(tmp_path):
    from wsss_platform.sweep.search import searcher

    cfg, dims = load_sweep_config(write(tmp_path, {
        "mask.bg_rule": {"choices": ["threshold", "power"]},
        "mask.bg_value": {"threshold": {"low": 0.3, "high": 0.7}, "power": {"low": 0.5, "high": 4, "log": True}},
        "caa.t": {"low": 1, "high": 4}}), ["tune.seed=7", "tune.startup_trials=2"])

    def proposals(seed_cfg):
        s = searcher(seed_cfg, dims)
        out = []
        for i in range(6):
            params = s.suggest(f"t{i}")
            s.on_trial_complete(f"t{i}", {"objective": float(params["caa.t"]) / 10})
            out.append(params)
        return out

    a, b = proposals(cfg), proposals(cfg)
    assert a == b
    for p in a:
        rule = p["mask.bg_rule"]
        assert set(p) == {"mask.bg_rule", f"mask.bg_value:{rule}", "caa.t"}  # only the drawn rule's value
        low, high = (0.3, 0.7) if rule == "threshold" else (0.5, 4)
        assert low <= p[f"mask.bg_value:{rule}"] <= high and p["caa.t"] in (1, 2, 3, 4)
    other = proposals(cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"seed": 8})}))
    assert other != a


def test_sources_and_refiner_lists_are_dimensions(tmp_path):
    """cam_source and refine are searched like any key; a refine choice is a list in the config."""
    from wsss_platform.sweep import cache
    from wsss_platform.sweep.config import apply_params

    cfg, dims = load_sweep_config(write(tmp_path, {"cam_source": {"choices": ["clip_es", "gradcam"]},
                                                   "refine": {"choices": [["caa"], ["caa", "crf"], []]},
                                                   "caa.attn_layers": {"choices": [2, 3]}}))
    by_key = {d.key: d for d in dims}
    assert by_key["refine"].choices == ("caa", "caa+crf", "")
    label = apply_params(cfg.label.model_dump(mode="json"), {"refine": "caa+crf", "cam_source": "gradcam"})
    built = build_config(LabelConfig, label)
    assert built.refine == ["caa", "crf"] and built.cam_source == "gradcam"
    assert build_config(LabelConfig, apply_params(label, {"refine": ""})).refine == []
    assert cache.aux_needed(cfg.label, dims) == ["attn/2", "attn/3"]  # L is searched: the base 8 is never used
    # the two CLIP sources share one feature cache, not one CAM cache
    a, b = cfg.label, build_config(LabelConfig, label)
    assert cache.features_uri("o", a) == cache.features_uri("o", b) and cache.cams_uri("o", a) != cache.cams_uri("o", b)


def test_a_training_sweep_is_validated_against_the_training_config(tmp_path, synthshapes):
    """`train:` instead of `label:`: training keys only, bounds checked by TrainConfig, val mIoU only.
    (The example config names the yardstick's model: skipped where ../shared is absent.)"""
    from wsss_platform.sweep.train_objective import trial_config

    cfg, dims = load_sweep_config(Path(__file__).parents[2] / "jobs" / "configs" / "synthshapes-train-sweep.yaml")
    assert cfg.train is not None and cfg.job is cfg.train and [d.name for d in dims][:2] == ["train.mu", "train.lr"]
    with pytest.raises(ConfigError, match=r"search_space.train.mu: high bound 1.5 is not a valid value"):
        load_sweep_config(None, ["train={}", "search_space={\"train.mu\": {\"low\": 0.5, \"high\": 1.5}}"])
    with pytest.raises(ConfigError, match=r"search_space.caa.t: not a sweepable training key"):
        load_sweep_config(None, ["train={}", "search_space={\"caa.t\": {\"low\": 1, \"high\": 2}}"])
    with pytest.raises(ConfigError, match=r"search_space.train.feature_scale: with model.freeze_backbone every trial "
                                         r"reads one feature cache"):
        from wsss_platform.sweep.train_objective import TrainObjective

        TrainObjective.check(load_sweep_config(None, ["train={\"model\": {\"freeze_backbone\": true}}",
                                                      "search_space={\"train.feature_scale\": {\"choices\": [0.5, 1]}}"])[0])
    with pytest.raises(ConfigError, match=r"a training sweep scores val mIoU"):
        load_sweep_config(None, ["train={}", "objective=sharpness", "search_space={\"train.mu\": {\"choices\": [0.9]}}"])
    # A trial: its params set, evaluated at report_chunks evenly spaced points, its own output, no MLflow run.
    trial = trial_config(cfg.train.model_dump(mode="json"), {"train.mu": 0.5, "train.head_lr_mult": 1}, "out/t1", 3)
    assert (trial.train.mu, trial.train.head_lr_mult, trial.output) == (0.5, 1.0, "out/t1")
    every = -(-cfg.train.train.iterations // 3)
    assert trial.train.eval_every == trial.train.checkpoint_every == every and not trial.tracking.enabled

"""Optuna's side of a sweep: the define-by-run space, the seeded TPE searcher for Tune, and the
study rebuilt from the finished trials for Optuna's plots."""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna

from wsss_platform.sweep.config import Dim, SweepConfig


def distribution(d: Dim) -> optuna.distributions.BaseDistribution:
    if d.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(list(d.choices))
    if d.kind == "int":
        return optuna.distributions.IntDistribution(int(d.low), int(d.high), log=d.log, step=int(d.step or 1))
    return optuna.distributions.FloatDistribution(d.low, d.high, log=d.log, step=d.step)


class DefineSpace:
    """Define-by-run space for ``OptunaSearch``: a conditional ``mask.bg_value:<rule>`` is drawn
    only for the rule the trial drew (TPE then models each rule's range on its own)."""

    def __init__(self, dims: list[Dim], base_rule: str) -> None:
        self.dims, self.base_rule = dims, base_rule

    def __call__(self, trial: optuna.Trial) -> None:
        for d in self.dims:
            if d.when is not None and trial.params.get("mask.bg_rule", self.base_rule) != d.when:
                continue
            if d.kind == "categorical":
                trial.suggest_categorical(d.name, list(d.choices))
            elif d.kind == "int":
                trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
            else:
                trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)


def space_size(dims: list[Dim]) -> int | None:
    """How many distinct settings the space holds, when that is finite and small to count
    (categorical and integer dimensions, none conditional); else None."""
    size = 1
    for d in dims:
        if d.when is not None or d.kind == "float":
            return None
        size *= len(d.choices) if d.kind == "categorical" else int((d.high - d.low) // (d.step or 1)) + 1
    return size


def searcher(cfg: SweepConfig, dims: list[Dim]):
    from ray.tune.search.optuna import OptunaSearch

    size = space_size(dims)
    if size is not None and size <= cfg.tune.num_trials:
        # TPE draws a small categorical space with repeats (6 trials over 6 templates scored 3 of
        # them); when the budget covers the space, enumerate it: each setting exactly once.
        sampler: optuna.samplers.BaseSampler = optuna.samplers.BruteForceSampler(seed=cfg.tune.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.startup_trials,
                                             # concurrent trials would otherwise be proposed the same point
                                             constant_liar=cfg.tune.max_concurrent_trials > 1)
    return OptunaSearch(DefineSpace(dims, cfg.label.mask.bg_rule), metric="objective", mode=cfg.mode, sampler=sampler)


def study_from_trials(rows: list[dict[str, Any]], dims: list[Dim], mode: str) -> optuna.Study:
    """An Optuna study holding the finished trials (``{"params": {...}, "value": float}`` each)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    by_name = {d.name: d for d in dims}
    for row in rows:
        params = {k: v for k, v in row["params"].items() if k in by_name}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distribution(by_name[k]) for k in params}, value=row["value"]))
    return study


def plot_study(study: optuna.Study, folder: str) -> dict[str, str]:
    """Optimisation history, parameter importances and parallel coordinates as PNGs.

    Returns:
        {plot name: path} for the plots that could be drawn, and {name: reason} under ``"skipped:"`` keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: dict[str, str] = {}
    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    os.makedirs(folder, exist_ok=True)
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():  # "experimental" and few-trials notices, once per plot
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            path = os.path.join(folder, f"{name}.png")
            fig.set_size_inches(9, 5.5)
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            out[name] = path
        except Exception as e:  # e.g. importances need two trials with distinct values
            out[f"skipped:{name}"] = f"{type(e).__name__}: {e}"
    return out

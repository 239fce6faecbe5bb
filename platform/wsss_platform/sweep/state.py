"""A sweep's state in its output: what makes it this sweep (fingerprint), and its summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from wsss_platform import storage
from wsss_platform.ownership import fingerprint, refuse_changed
from wsss_platform.ray_utils import code_version
from wsss_platform.sweep.config import SweepConfig

RESULT_FILES = ("cache", "tune", "sweep.json", "best.yaml", "trials.csv", "plots")


@dataclass
class SweepSummary:
    output: str
    num_trials: int = 0
    complete: int = 0
    stopped: int = 0
    errored: int = 0
    best_trial: str | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_yaml: str | None = None
    parent_run_id: str | None = None
    parent_run_url: str | None = None
    resumed: bool = False
    interrupted: bool = False
    seconds: float = 0.0
    objective: str = "miou"

    def line(self) -> str:
        s = (f"{self.complete} trials complete, {self.stopped} stopped early, {self.errored} failed "
             f"(budget {self.num_trials}) in {self.seconds:.0f}s")
        if self.best_value is not None:
            s += f"; best {self.objective} {self.best_value:.4f} ({self.best_trial}) -> {self.best_yaml}"
        return s


def sweep_settings(cfg: SweepConfig) -> dict[str, Any]:
    """What makes two runs the same sweep (a resume must not mix two different ones); storage
    options are where, not what."""
    settings = cfg.model_dump(mode="json", exclude={"overwrite": True, "ray_address": True, "tracking": {"run_name"},
                                                    "label": {"dataset": {"storage"}}, "train": {"dataset": {"storage"}}})
    if settings.get("train") is None:  # labeling sweeps keep the fingerprint they had before training sweeps
        settings.pop("train", None)
    return settings


def claim(cfg: SweepConfig, out: str, log) -> dict[str, Any]:
    """The sweep's state in the (locked) output: refuse a different sweep there; start over on overwrite."""
    opts = cfg.storage
    if cfg.overwrite:
        for name in RESULT_FILES:
            storage.remove(storage.join(out, name), opts)
    state_uri = storage.join(out, "sweep.json")
    state = json.loads(storage.read_text(state_uri, opts)) if storage.exists(state_uri, opts) else {}
    settings = sweep_settings(cfg)
    if state and state.get("fingerprint") != fingerprint(settings):
        refuse_changed(out, state.get("settings") or state.get("config", {}), settings, "a sweep")
    # Claim the output before caching anything in it, so a later, different sweep cannot pick up these caches.
    state = {"fingerprint": fingerprint(settings), "settings": settings, "code": code_version()} | {
        k: v for k, v in state.items() if k in ("parent_run_id", "subset", "finished")}
    save_state(out, state, opts)
    return state


def save_state(out: str, state: dict[str, Any], opts) -> None:
    storage.write_text(storage.join(out, "sweep.json"), json.dumps(state, indent=2), opts)

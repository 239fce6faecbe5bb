"""What a sweep shows while it runs: one line per finished trial, and one MLflow child run per
trial named for what it is, holding the trial's own metrics only (no Tune ``config/*`` or
bookkeeping columns: they would crowd the run table and open the chart view on them)."""

from __future__ import annotations

import math
import re
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune import Callback

from wsss_platform import metrics

REPORTED = re.compile(r"^(objective|miou|miou_raw|miou_confident|sharpness|ignore_fraction|images|complete|loss|lr|iteration|val_miou|val_iou/.+|"
                      r"cams_cached|refiner_images_run|seconds|seconds_cams|seconds_refine|iou/.+)$")


def trial_name(number: int, trial: Any) -> str:
    """``trial 7 · a80143a6``: the order it started in, and Tune's id."""
    return f"trial {number} · {str(trial.trial_id)[:8]}"


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if REPORTED.match(k) and isinstance(v, int | float) and not isinstance(v, bool)}


class TrialRuns(MLflowLoggerCallback):
    """Tune's MLflow logger with readable run names and only the trial's own metrics."""

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:
            tags = self.tags | {"trial_name": str(trial), "wsss.trial_id": str(trial.trial_id)}
            run = self.mlflow_util.start_run(tags=tags, run_name=trial_name(len(self._trial_runs) + 1, trial))
            self._trial_runs[trial] = run.info.run_id
        if not self.log_params_on_trial_end:
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=trial.config)

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=trial_metrics(result),
                                     step=result.get("training_iteration", iteration))


class TrialLines(Callback):
    """``[wsss sweep] trial 3/6 · a80143a6 · miou 0.5123 (best 0.5321) · 4.1s``, one per trial."""

    def __init__(self, total: int, objective: str, mode: str, log=None) -> None:
        # print looked up when called: Tune pickles this callback, and Ray Train patches builtins.print
        # in processes that ran a training, after which the original print no longer pickles by name
        self.total, self.objective, self.mode, self._log = total, objective, mode, log
        self.best: float | None = None
        self.finished = 0

    def log(self, message: str) -> None:
        (self._log or print)(message)

    def _better(self, value: float) -> bool:
        return self.best is None or (value > self.best if self.mode == "max" else value < self.best)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += 1
        result = trial.last_result or {}
        value = result.get("objective")
        complete = result.get("complete") == 1
        if complete and isinstance(value, float) and not math.isnan(value) and self._better(value):
            self.best = value
            metrics.record("wsss_sweep_best_objective", value, objective=self.objective)
        metrics.record("wsss_sweep_trials", 1, status="complete" if complete else "stopped")
        what = f"{self.objective} {value:.4f}" if isinstance(value, float) else "no score"
        if not complete:
            what += " (stopped early)"
        best = f" (best {self.best:.4f})" if self.best is not None else ""
        self.log(f"[wsss sweep] {trial_name(self.finished, trial)} ({self.finished}/{self.total}) · {what}{best} · "
                 f"{result.get('seconds', 0.0):.1f}s")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finished += 1
        metrics.record("wsss_sweep_trials", 1, status="failed")
        self.log(f"[wsss sweep] {trial_name(self.finished, trial)} ({self.finished}/{self.total}) · FAILED "
                 f"(see {trial.local_path})")

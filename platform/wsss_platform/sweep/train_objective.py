"""Training trials: each trial trains a segmenter on Ray Train and is scored by its val mIoU.

In Train V2 a Tune trial is a driver function that builds a ``TorchTrainer`` and calls ``fit()``;
Train's reports reach Tune through ``TuneReportCallback``. Every trial evaluates at
``tune.report_chunks`` evenly spaced iterations (its ``checkpoint_every`` = ``eval_every``), so ASHA
compares trials on val mIoU at the same points and stops the weak ones early. Each trial trains into
``<sweep output>/trials/<trial id>/`` (its checkpoints: the best trial's model is kept there).
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

from ray.tune.integration.ray_train import TuneReportCallback

from wsss_platform import outputs, storage
from wsss_platform.config import ConfigError, build_config
from wsss_platform.ray_utils import state_api_error
from wsss_platform.sweep.config import Dim, SweepConfig, apply_params
from wsss_platform.train import job
from wsss_platform.train.config import TrainConfig

TRIAL_CPUS = 0.1
"""The trial's own driver only waits on its trainer; the workers reserve their own resources."""


class ObjectiveReport(TuneReportCallback):
    """Train's reports to Tune, with the sweep's names: ``objective`` (= ``miou`` = val mIoU),
    ``complete`` (1 at the last iteration) and ``seconds``."""

    def __init__(self, iterations: int) -> None:
        super().__init__()
        self.iterations, self.t0 = iterations, time.time()

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = dict(metrics[0])
        miou = float(m.get("val_miou", math.nan))
        m |= {"objective": miou, "miou": miou, "complete": int(m.get("iteration", 0) >= self.iterations),
              "seconds": time.time() - self.t0}
        super().after_report(run_context, [m, *metrics[1:]], checkpoint)


def trial_config(train: dict[str, Any], params: dict[str, Any], output: str, chunks: int) -> TrainConfig:
    """The training config of one trial: the params set, evaluated at ``chunks`` evenly spaced points."""
    cfg = build_config(TrainConfig, apply_params(train, params), source="trial")
    every = max(1, math.ceil(cfg.train.iterations / chunks))
    return cfg.model_copy(update={
        "output": output, "tracking": cfg.tracking.model_copy(update={"enabled": False}),
        "train": cfg.train.model_copy(update={"checkpoint_every": every, "eval_every": every})})


def train_trial(params: dict[str, Any], train: dict[str, Any], output: str, chunks: int) -> None:
    """Tune's function trainable (runs in the trial's actor)."""
    import ray.tune

    cfg = trial_config(train, params, storage.join(output, "trials", ray.tune.get_context().get_trial_id()), chunks)
    job.plan(cfg, storage.join(output, outputs.INDEX)).trainer(callbacks=[ObjectiveReport(cfg.train.iterations)]).fit()


FEATURE_KEYS = ("model.backbone", "model.pretrained", "model.output_stride", "model.freeze_backbone",
                "train.feature_scale", "train.seed")
"""What shapes a frozen backbone's features (train.seed: its random weights)."""


class TrainObjective:
    """Val mIoU of a segmenter trained with each trial's settings."""

    # Each trial drives its own Train run (controller, workers): nothing to keep, and a reused
    # function-trainable actor fails the next trial ("requires reset_config()").
    reuse_actors = False
    # ASHA stops a trial by killing its actor, and with it the trial's Train controller; Train then
    # frees that run's workers (their placement group) through the State API, which the dashboard
    # serves. Without it every stopped trial would hold its workers' CPUs until the sweep ends.
    ray_options: ClassVar[dict[str, Any]] = {"include_dashboard": True}

    def __init__(self, cfg: SweepConfig, out: str, gpus: float) -> None:
        self.cfg, self.out, self.gpus = cfg, out, gpus
        assert cfg.train is not None
        self.train = cfg.train

    @classmethod
    def check(cls, cfg: SweepConfig) -> None:
        if cfg.train is not None and not cfg.train.train.val_split:
            raise ConfigError("train.train.val_split: a training sweep scores each trial on the val split; set one "
                              "with ground-truth masks")
        if cfg.train is not None and cfg.train.model.freeze_backbone:
            shaping = [k for k in cfg.search_space if k.startswith(FEATURE_KEYS)]
            if shaping:  # the features are computed once, before the trials, for the base config
                raise ConfigError(f"search_space.{shaping[0]}: with model.freeze_backbone every trial reads one feature "
                                  "cache; sweep the head's settings, train.mu or train.lr, or one sweep per backbone")

    def resources(self) -> dict[str, float]:
        return {"cpu": TRIAL_CPUS}

    def prepare(self, dims: list[Dim], log) -> list[str]:
        if why := state_api_error():
            raise ConfigError(
                f"a training sweep needs Ray's State API (the Ray dashboard) reachable from Ray workers: Ray Train "
                f"frees the workers of a trial that ASHA stops through it. Start the cluster with the dashboard "
                f"(`ray start --head --include-dashboard true`; KubeRay does by default), or leave ray_address unset "
                f"to let wsss start a local Ray; with several Ray instances on one machine, set RAY_ADDRESS for the "
                f"cluster's processes. ({why.splitlines()[0][:300]})")
        p = job.plan(self.train, storage.join(self.out, outputs.INDEX))  # labels, val split, model paths checked once
        p.keep_indexes()  # the splits parsed once, here: every trial reads their index
        job.check_cpus(p.cfg, self.cfg.tune.max_concurrent_trials, TRIAL_CPUS)
        self.train = p.cfg  # absolute paths: the trials run in folders of their own
        if p.cfg.model.freeze_backbone and not p.cfg.train.feature_cache:  # one feature cache for every trial
            self.train = p.cfg.model_copy(update={"train": p.cfg.train.model_copy(
                update={"feature_cache": storage.join(self.out, "cache", "features")})})
        # the trials' shared inputs, made once (a frozen backbone's features)
        type(p.recipe)(self.train).prepare(p.ds, p.ds.ids, p.loop_config["class_names"], self.gpus > 0, log)
        val_ids = p.loop_config["val_ids"]
        log(f"[wsss sweep] {p.ds.uri} split {p.cfg.dataset.split}: training {p.cfg.train.iterations} iterations a "
            f"trial on {len(p.ds.ids)} images, scored on {len(val_ids)} val images at {self.cfg.tune.report_chunks} "
            f"points; {self.cfg.tune.num_trials} trials over {', '.join(d.name for d in dims)} -> {self.out}")
        return val_ids

    def trainable(self) -> Any:
        from ray import tune

        # No credentials in anything Tune pickles: the dataset section goes as its worker payload.
        train = self.train.model_dump(mode="json") | {"dataset": self.train.dataset.worker_payload()}
        return tune.with_parameters(train_trial, train=train, output=self.out, chunks=self.cfg.tune.report_chunks)

    def preview(self, params: dict[str, Any]) -> bytes | None:
        return None  # the best trial's checkpoint is in its trial folder; `wsss predict` shows it

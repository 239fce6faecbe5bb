"""The training loop each Ray Train worker runs (``train_loop_per_worker``), for every recipe.

Per worker: the recipe's module (DDP through ``ray.train.torch.prepare_model``), SGD or AdamW with the
backbone at ``lr`` and the heads at ``head_lr_mult × lr``, a poly schedule after a linear warm-up, AMP on
GPU, the recipe's losses on the streamed shard of samples (every term logged). Every ``checkpoint_every`` iterations the model, optimiser,
scheduler and iteration go to ``ray.train.report`` (rank 0 writes the checkpoint), so a restarted
worker group resumes at the iteration after it: none lost, none run twice. Every ``eval_every``
iterations the val split is scored (``recipe.validation``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import ray.train
import ray.train.torch
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from wsss_platform import metrics as live_metrics
from wsss_platform.checkpoint import FILE as CHECKPOINT_FILE
from wsss_platform.checkpoint import decode as decode_checkpoint
from wsss_platform.checkpoint import resolve_weights
from wsss_platform.config import ConfigError
from wsss_platform.console import Progress
from wsss_platform.datasets import read_index
from wsss_platform.train.config import TrainBase
from wsss_platform.train.evaluate import my_slice, unwrap
from wsss_platform.train.recipes import Recipe, recipe_class


def poly_lambda(iterations: int, warmup: int, power: float):
    """LR factor at iteration i: linear warm-up to 1, then ``(1 - i / iterations) ** power``."""
    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return max(0.0, 1 - i / iterations) ** power
    return factor


def _amp_dtype(cfg: TrainBase, device: torch.device) -> torch.dtype | None:
    amp = cfg.train.amp
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def build(recipe: Recipe, class_names: list[str], weights: Any):
    """The recipe's module (DDP-prepared), optimiser and scheduler."""
    model = recipe.build(class_names, weights)
    t = recipe.cfg.train
    groups = model.param_groups(t.lr, t.head_lr_mult, t.weight_decay)
    optimizer = (torch.optim.AdamW(groups, lr=t.lr) if t.optimizer == "adamw"
                 else torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(t.iterations, t.warmup_iterations, t.poly_power))
    return ray.train.torch.prepare_model(model), optimizer, scheduler


def restore(recipe: Recipe, model, optimizer, scheduler) -> int:
    """The iteration to start at: 0, or the one after the last checkpoint."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d, open(os.path.join(d, CHECKPOINT_FILE), "rb") as f:
        state = decode_checkpoint(f.read(), f"{ckpt.path}/{CHECKPOINT_FILE}")
    recipe.network(unwrap(model)).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["iteration"])


def report(metrics: dict[str, float], recipe: Recipe | None = None, model=None, optimizer=None, scheduler=None,
           iteration: int = 0, spec: dict[str, Any] | None = None) -> None:
    """``ray.train.report`` on every worker; with a model, rank 0 attaches a checkpoint: the recipe's
    network, the optimiser's state, and ``spec`` (what rebuilds the network, ``recipe.spec``)."""
    if model is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": recipe.network(unwrap(model)).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "iteration": iteration, **(spec or {})},
                   os.path.join(d, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


UNVALIDATED = -1.0
"""The score of a checkpoint taken between validations: below every val score (IoUs are in [0, 1]).
Finite, because Train's checkpoint snapshot stores -inf as null, and a run resumed from it fails
ranking its next checkpoint against None."""


def scored(metrics: dict[str, float], score: str, validated_ever: bool) -> dict[str, float]:
    """A checkpoint's report with the key Train ranks checkpoints by: one taken between validations
    scores ``UNVALIDATED``, below every validated one (without the key Train's checkpoint manager logs
    an error for each such report, and ranks it the same)."""
    return metrics if not validated_ever or score in metrics else {**metrics, score: UNVALIDATED}


class StepLog:
    """Rank 0's per-step loss and LR into the job's MLflow run, sent at each checkpoint, once per step.

    Steps after the last checkpoint die with a failed worker and are logged when they are run again.
    A worker can also die after its checkpoint is written but before Train's controller has taken
    the report (it polls every few seconds); the group then resumes from the checkpoint before and
    redoes steps already logged. MLflow appends metric values and cannot delete one, so the steps up
    to the run's last logged one are skipped: every step appears once in a run that resumed."""

    def __init__(self, mlflow: dict[str, str] | None) -> None:
        self.client = self.run_id = None
        self.pending: list[Any] = []
        self.logged_up_to = 0
        if mlflow:
            self.client, self.run_id = MlflowClient(mlflow["tracking_uri"]), mlflow["run_id"]
            self.logged_up_to = max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=0)

    def add(self, metrics: dict[str, float], step: int, flush: bool = False) -> None:
        if self.client is None or step <= self.logged_up_to:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if flush:
            for i in range(0, len(self.pending), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
            self.pending = []


def step(recipe: Recipe, model, optimizer, scheduler, batch: dict[str, torch.Tensor], amp: torch.dtype | None,
         device: torch.device) -> dict[str, float]:
    """One optimiser step of the recipe's losses on a batch; returns every term (``loss``: the total)."""
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        terms = recipe.losses(model, batch, scheduler.last_epoch, device)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        # diverged: every later step would be NaN too (and each restart would diverge again)
        raise FloatingPointError(f"the loss is {float(loss)} at step {scheduler.last_epoch + 1}: training diverged; lower "
                                 "train.lr (or train.head_lr_mult), or add train.warmup_iterations")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    recipe = recipe_class(config["recipe"])
    cfg = recipe.config.model_validate(config["cfg"])
    recipe = recipe(cfg)
    if not config.get("verbose"):  # Train's per-report INFO lines reach the console whatever LoggingConfig says
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    if cfg.compute.torch_threads:
        torch.set_num_threads(cfg.compute.torch_threads)
    torch.manual_seed(cfg.train.seed)  # the same initial head on every worker (DDP broadcasts it too)
    device = ray.train.torch.get_device()
    model, optimizer, scheduler = build(recipe, config["class_names"], resolve_weights(cfg.model.pretrained,
                                                                                       cfg.dataset.storage))
    it = restore(recipe, model, optimizer, scheduler)
    rank0 = ray.train.get_context().get_world_rank() == 0
    log, amp, t = StepLog(config.get("mlflow") if rank0 else None), _amp_dtype(cfg, device), cfg.train
    spec = recipe.spec(unwrap(model))
    shard = ray.train.get_dataset_shard("train")
    # this worker's slice of the val split's index: no worker holds (or parses) the whole split
    val_ds = read_index(config["val_index"], cfg.dataset.storage, ids=my_slice(recipe.val_ids(config)),
                        max_pixels=cfg.dataset.max_image_pixels) if config["val_ids"] else None
    progress = Progress("[wsss train]", t.iterations, "iterations", stream=sys.stdout, start=it,
                        images_per_unit=t.batch_size * ray.train.get_context().get_world_size())
    val = ""  # the last val score, shown on every progress line after it
    while it < t.iterations:
        before = it
        for batch in shard.iter_torch_batches(batch_size=t.batch_size, drop_last=True):
            if it == progress.start:
                progress.t0 = time.perf_counter()  # the rate and ETA from the first batch on, not the start-up
            metrics = step(recipe, model, optimizer, scheduler, batch, amp, device)
            it = progress.done = it + 1
            metrics |= {"lr": scheduler.get_last_lr()[0], "iteration": it, "images_per_s": progress.rate * t.batch_size}
            if it % t.eval_every == 0 or it == t.iterations:
                metrics |= recipe.validation(model, val_ds, config, device, final=it == t.iterations)
            checkpoint = it % t.checkpoint_every == 0 or it == t.iterations
            if checkpoint:
                report(scored(metrics, recipe.score, bool(config["val_ids"])), recipe, model, optimizer, scheduler, it,
                       spec)
            log.add(metrics, it, flush=checkpoint)  # after the checkpoint is saved
            if rank0:
                live_metrics.record_train_step(config["recipe"], metrics, ray.train.get_context().get_world_size())
                if config.get("progress"):
                    val = f" · {recipe.score} {metrics[recipe.score]:.4f}" if recipe.score in metrics else val
                    show(progress, f" · loss {metrics['loss']:.4f}{val}", final=it == t.iterations)
            if it >= t.iterations:
                break
        if it == before:
            raise ConfigError(f"the train split gives no batch of {t.batch_size} per worker for {cfg.compute.num_workers} "
                              "workers: lower train.batch_size or compute.num_workers")


def show(progress: Progress, note: str, final: bool) -> None:
    """Rank 0's progress line, every few seconds and at the end."""
    progress.note = note
    progress.update()
    if final:
        progress.finish()

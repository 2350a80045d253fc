"""Pruning while fine-tuning: one Lightning callback steps any pruner through any schedule.

The three objects are separate (as in Torch-Pruning): an importance scores (inside a pruner), a
pruner removes (`step(target)`), a schedule says how much and when (`points`). `PruningCallback`
is the only loop: at each scheduled optimizer step it calls `pruner.step(target)` and, after a
structural step (parameters replaced by smaller ones), rebuilds the optimizers and the loss's
width-dependent adapters. It logs the accuracy-vs-sparsity curve itself. `prune_model` runs
it in a single fit and returns the numbers of the pruned model.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from kdpipe.compress.schedules import PrunePoint, Schedule
from kdpipe.compress.structured import accumulate_gradients
from kdpipe.errors import ConfigError
from kdpipe.losses.base import probe_shapes
from kdpipe.models import count_params

log = logging.getLogger("kdpipe")


class Pruner(Protocol):
    """What the callback needs from a pruner; built as `cls(model, example_inputs, **config)`."""

    model: nn.Module
    structural: bool  # True: `step` replaces parameters (the optimizer must be rebuilt)

    def step(self, target: float) -> None:
        """Prune to the overall sparsity `target`; never revives what an earlier step removed."""
        ...

    def sparsity(self) -> float:
        """The sparsity reached, in the unit of `target`."""
        ...

    def finalize(self) -> None:
        """Make the pruning permanent (fold masks) once training is over."""
        ...


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one training epoch (what `trainer.global_step` counts)."""
    batches = trainer.num_training_batches
    if math.isinf(batches):
        raise ConfigError("a pruning schedule needs the number of training batches per epoch; the training "
                          "data has no length (set trainer.limit_train_batches to a number)")
    return max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """New optimizers over the module's current parameters (`configure_optimizers` again), with
    each LR scheduler advanced to where the old one was. Optimizer state (momenta) restarts."""
    trainer.strategy.setup_optimizers(trainer)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau:
                continue
            done = trainer.current_epoch if config.interval == "epoch" else trainer.global_step
            for _ in range(done // max(1, config.frequency)):
                config.scheduler.step()


class PruningCallback(Callback):
    """Prunes `pruner` on `schedule` during the fit it is given to.

    At the first batch whose `trainer.global_step` reaches a point, it steps the pruner to that
    point's target; a pruner whose importance reads gradients (`gradient_batches` > 0) gets them
    from that many training batches first. After a structural step it re-runs the `setup` of a
    distillation loss (`pl_module.loss`) whose student layers changed shape (FitNet's adapter is
    sized from the student: a fresh one is built) and rebuilds the optimizers.

    Logged through the trainer's loggers: `prune/schedule_sparsity` at each point (MLflow step =
    optimizer step), and after every validation one point of the accuracy-vs-sparsity curve,
    `prune/step_target`, `prune/step_sparsity`, `prune/step_params` and `prune/step_<monitor>`
    (MLflow step k = the k-th validation: with `IterativeSchedule` and one epoch a step, the
    accuracy after cut k and its fine-tuning).
    """

    def __init__(self, pruner: Pruner, schedule: Schedule, monitor: str = "val/acc") -> None:
        self.pruner, self.schedule, self.monitor = pruner, schedule, monitor
        self.pending: list[PrunePoint] = []
        self.applied: list[PrunePoint] = []
        self.curve: list[dict[str, float]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.pruner.structural and trainer.world_size > 1:
            raise ConfigError(f"{type(self.pruner).__name__} replaces parameters during the fit, which a "
                              f"distributed strategy cannot follow ({trainer.world_size} processes); "
                              f"prune on one device (trainer.devices=1) or use prune=magnitude")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pending = sorted(self.schedule.points(steps_per_epoch(trainer)), key=lambda p: p.step)
        self.applied, self.curve = [], []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch,
                             batch_idx: int) -> None:
        due = [p for p in self.pending if p.step <= trainer.global_step]
        if due:
            self.pending = self.pending[len(due):]
            self._prune(trainer, pl_module, due[-1], example=batch[0][:2])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        point = {"prune/step_target": self.applied[-1].target if self.applied else 0.0,
                 "prune/step_sparsity": self.pruner.sparsity(),
                 "prune/step_params": float(count_params(self.pruner.model)[0]),
                 f"prune/step_{self.monitor.replace('/', '_')}": float(value)}
        self.curve.append(point)
        self._log(trainer, point, len(self.curve))
        log.info("prune: target %.3f, sparsity %.3f, %s %.4f", point["prune/step_target"],
                 point["prune/step_sparsity"], self.monitor, float(value))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pending:  # the fit stopped before the schedule did (max_steps, an early stop)
            log.warning("prune: the fit ended at step %d, before the schedule; "
                        "pruning to %.3f without fine-tuning",
                        trainer.global_step, self.pending[-1].target)
            point, self.pending = self.pending[-1], []
            self._prune(trainer, pl_module, point, example=None)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: PrunePoint,
               example: torch.Tensor | None) -> None:
        model = self.pruner.model
        if getattr(self.pruner, "gradient_batches", 0):
            accumulate_gradients(model, trainer.train_dataloader, self.pruner.gradient_batches)
        shapes = _loss_student_shapes(pl_module, model, example)
        params = count_params(model)[0]
        self.pruner.step(point.target)
        model.zero_grad(set_to_none=True)
        if self.pruner.structural and example is not None and count_params(model)[0] != params:
            if shapes is not None and shapes != _loss_student_shapes(pl_module, model, example):
                pl_module.loss.setup(model, getattr(pl_module, "teacher", None), example)
                pl_module.loss.to(example.device)
            rebuild_optimizers(trainer)
        self.applied.append(point)
        self._log(trainer, {"prune/schedule_sparsity": point.target}, trainer.global_step)

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _loss_student_shapes(pl_module: pl.LightningModule, student: nn.Module, example: torch.Tensor | None):
    """The output shapes of the student layers a distillation loss reads (None without such a
    loss): when pruning changes them, the loss's adapters must be built again."""
    loss = getattr(pl_module, "loss", None)
    layers = tuple(getattr(loss, "student_layers", ()) or ())
    if example is None or not layers or not callable(getattr(loss, "setup", None)):
        return None
    return probe_shapes(student, layers, example, "student")


def prune_model(pruner: Pruner, schedule: Schedule, finetune: Callable[[Sequence[Callback], int], None],
                monitor: str = "val/acc") -> dict[str, float]:
    """Prune `pruner.model` on `schedule` during one fine-tuning fit, then make it permanent.

    `finetune(callbacks, epochs)` must run one Lightning fit of a module that trains
    `pruner.model`, with `callbacks` added to the trainer; it is called once, for
    `schedule.epochs` epochs (not at all for 0: the points are then applied at once). Returns
    `prune/sparsity` (in the pruner's unit: zero weights, or channels removed) and, for a
    structural pruner, `prune/params_removed`. The model is left in eval mode."""
    model = pruner.model
    params_before = count_params(model)[0]
    if schedule.epochs > 0:
        finetune([PruningCallback(pruner, schedule, monitor)], schedule.epochs)
    else:
        for point in schedule.points(1):
            pruner.step(point.target)
    pruner.finalize()
    model.eval()
    metrics = {"prune/sparsity": pruner.sparsity()}
    if pruner.structural:
        metrics["prune/params_removed"] = 1.0 - count_params(model)[0] / params_before
    return metrics

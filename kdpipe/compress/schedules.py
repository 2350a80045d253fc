"""Pruning schedules, declared in config (`prune.schedule.name`): how much to prune and when.

- `one_shot`: one step to the target, then fine-tuning.
- `iterative`: `steps` steps, each removing the same fraction of the weights still left
  (Han et al. 2015, sec. 3.3: prune, retrain, repeat), fine-tuning after each.
- `agp`: automated gradual pruning during training on the cubic schedule of Zhu & Gupta (2017,
  "To prune, or not to prune", eq. 1), as a Lightning callback.

The first two are a loop of (prune step, fine-tune) that the prune stage runs for any pruner;
`agp` is the callback below. No scheme has code of its own beyond its list of targets.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

SCHEDULES = ("one_shot", "iterative", "agp")


def step_targets(name: str, final: float, steps: int = 1) -> list[float]:
    """The sparsity reached after each step of a loop schedule. For `iterative`,
    1 - (1 - s_k) = (1 - final)^(k / steps): every step keeps the same fraction of what is left,
    so early steps (when the network has most slack) and late ones hurt about equally."""
    if name == "one_shot":
        return [final]
    if name == "iterative":
        if steps < 1:
            raise ValueError(f"prune.schedule.steps={steps} must be >= 1")
        return [1.0 - (1.0 - final) ** (k / steps) for k in range(1, steps + 1)]
    raise ValueError(f"prune.schedule.name={name!r} is not a loop schedule; use one of {', '.join(SCHEDULES)}")


def agp_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017), eq. 1: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 for
    t0 <= t <= t0 + n dt. Prunes fast while redundancy is high, slowly near the target."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


class AGPCallback(Callback):
    """Gradual pruning during fine-tuning: every `frequency` optimizer steps between
    `start_epoch` and `end_epoch`, prune to the AGP target with `prune_to(sparsity)`.
    The masks stay in place between steps so the training keeps pruned weights at zero."""

    def __init__(self, prune_to: Callable[[float], None], initial: float, final: float,
                 start_epoch: float, end_epoch: float, frequency: int) -> None:
        self.prune_to = prune_to
        self.initial, self.final = initial, final
        self.start_epoch, self.end_epoch, self.frequency = start_epoch, end_epoch, max(int(frequency), 1)
        self.history: list[tuple[int, float]] = []

    def _bounds(self, trainer: pl.Trainer) -> tuple[int, int]:
        per_epoch = max(int(trainer.num_training_batches), 1)
        return int(self.start_epoch * per_epoch), max(int(self.end_epoch * per_epoch), int(self.start_epoch * per_epoch) + 1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        step = trainer.global_step
        start, end = self._bounds(trainer)
        if step % self.frequency == 0 or step == end:
            target = agp_sparsity(step, self.initial, self.final, start, end)
            if not self.history or target > self.history[-1][1]:
                self.prune_to(target)
                self.history.append((step, target))

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.history or self.history[-1][1] < self.final:  # training shorter than the schedule
            self.prune_to(self.final)
            self.history.append((trainer.global_step, self.final))

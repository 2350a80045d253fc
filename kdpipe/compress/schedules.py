"""Pruning schedules: how much to prune, and when, during one fine-tuning fit.

A schedule is a small object built from `conf/prune/schedule/<name>.yaml` (a `_target_`). It
knows the length of the fit it runs in (`epochs`) and, given the optimizer steps of one epoch,
lists its pruning points: at optimizer step `step`, prune to the overall sparsity `target`.
`kdpipe.compress.PruningCallback` steps any pruner through any schedule; a user's own schedule
is any class with `epochs` and `points` (the `Schedule` protocol), given by its import path.

- `OneShotSchedule`: one cut to the target at step 0, then `epochs` of fine-tuning.
- `IterativeSchedule`: `steps` cuts, each removing the same share of what is left, one at the
  start of each block of `epochs_per_step` epochs (Han et al. 2015, sec. 3.3: prune, retrain,
  repeat).
- `AGPSchedule`: automated gradual pruning on the cubic schedule of Zhu & Gupta (2017, "To
  prune, or not to prune", eq. 1), every `frequency` optimizer steps.

Imports nothing heavy, so config checks build schedules (and their range checks run) before any
training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kdpipe import limits
from kdpipe.errors import ConfigError

_EPOCHS = "prune.finetune.epochs"


@dataclass(frozen=True)
class PrunePoint:
    """Prune to the overall sparsity `target` when the fit reaches optimizer step `step`."""

    step: int
    target: float


class Schedule(Protocol):
    """What the pruning callback needs from a schedule."""

    epochs: int  # the length of the fine-tuning fit that the points fall in

    def points(self, steps_per_epoch: int) -> list[PrunePoint]:
        """The pruning points, in order of `step`, targets never decreasing."""
        ...


class OneShotSchedule:
    """One cut to `sparsity` before the first training step, then `epochs` of fine-tuning
    (0: no fine-tuning)."""

    def __init__(self, sparsity: float, epochs: int) -> None:
        self.sparsity = limits.sparsity(sparsity)
        self.epochs = limits.whole_number(epochs, _EPOCHS, "fine-tuning epochs after the cut; 0 for none")

    def points(self, steps_per_epoch: int) -> list[PrunePoint]:
        return [PrunePoint(0, self.sparsity)]


def iterative_targets(final: float, steps: int) -> list[float]:
    """The sparsity after each of `steps` cuts: 1 - s_k = (1 - final)^(k / steps), so every cut
    keeps the same fraction of the weights left, and early cuts (when the network has most slack)
    and late ones hurt about equally."""
    return [1.0 - (1.0 - final) ** (k / steps) for k in range(1, steps + 1)]


class IterativeSchedule:
    """`steps` cuts to `iterative_targets(sparsity, steps)`, one at the start of each block of
    `epochs_per_step` fine-tuning epochs: the fit lasts `steps * epochs_per_step` epochs."""

    def __init__(self, sparsity: float, steps: int, epochs_per_step: int) -> None:
        self.sparsity = limits.sparsity(sparsity)
        self.steps = limits.positive_int(steps, "prune.schedule.steps",
                                         "cuts to reach prune.sparsity, e.g. 5")
        self.epochs_per_step = limits.whole_number(epochs_per_step, _EPOCHS,
                                                   "fine-tuning epochs after each cut")
        self.epochs = self.steps * self.epochs_per_step

    def points(self, steps_per_epoch: int) -> list[PrunePoint]:
        block = self.epochs_per_step * steps_per_epoch
        return [PrunePoint(k * block, s) for k, s in enumerate(iterative_targets(self.sparsity, self.steps))]


def agp_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017), eq. 1: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 for
    t0 <= t <= t0 + n dt. Prunes fast while redundancy is high, slowly near the target."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


class AGPSchedule:
    """Automated gradual pruning (Zhu & Gupta 2017): from `start_epoch` to `end_epoch` of an
    `epochs`-long fit, every `frequency` optimizer steps, prune to `agp_sparsity`; the target is
    reached at `end_epoch` and the remaining epochs only fine-tune. Epochs may be fractions."""

    def __init__(self, sparsity: float, epochs: int, initial_sparsity: float = 0.0, start_epoch: float = 0.0,
                 end_epoch: float = 1.0, frequency: int = 10) -> None:
        self.sparsity = limits.sparsity(sparsity)
        self.epochs = limits.positive_int(epochs, _EPOCHS, "agp prunes while fine-tuning, e.g. 3")
        self.initial = limits.sparsity(initial_sparsity, "prune.schedule.initial_sparsity")
        if self.initial > self.sparsity:
            raise ConfigError(f"prune.schedule.initial_sparsity={initial_sparsity} must lie in "
                              f"[0, prune.sparsity={sparsity}]")
        self.start_epoch = limits.non_negative(start_epoch, "prune.schedule.start_epoch", "in epochs, e.g. 0")
        self.end_epoch = limits.non_negative(end_epoch, "prune.schedule.end_epoch", "in epochs, e.g. 1")
        if not self.start_epoch < self.end_epoch <= self.epochs:
            raise ConfigError(f"prune.schedule: agp needs start_epoch < end_epoch <= prune.finetune.epochs "
                              f"(got {start_epoch}, {end_epoch}, {epochs})")
        self.frequency = limits.positive_int(frequency, "prune.schedule.frequency",
                                             "optimizer steps, e.g. 10")

    def points(self, steps_per_epoch: int) -> list[PrunePoint]:
        start = int(self.start_epoch * steps_per_epoch)
        end = max(int(self.end_epoch * steps_per_epoch), start + 1)
        points: list[PrunePoint] = []
        reached = 0.0
        for step in [*range(start, end, self.frequency), end]:
            target = agp_sparsity(step, self.initial, self.sparsity, start, end)
            if target > reached:  # a point that prunes nothing is left out
                points.append(PrunePoint(step, target))
                reached = target
        return points

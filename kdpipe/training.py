"""Training helpers below every stage and scheme: the optimiser built from config, and `Fitter`,
which runs one named Lightning fit that checkpoints into its own folder and resumes there.

Layering: `stages` and `distill.schemes` call down into this module; it imports neither.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from mlflow.entities import Run
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from kdpipe.faults import checkpoint_dir, resume_from, stop_if_terminated

log = logging.getLogger("kdpipe")

# Keyword arguments of torch.optim.lr_scheduler classes that give the length of the schedule:
# written `null` in config, they are set to the epochs of each fit (a fine-tuning fit is shorter).
SCHEDULE_LENGTH_KEYS = ("T_max", "total_iters")


@dataclass
class Optim:
    """An optimiser and an optional LR scheduler, each a `functools.partial` that Hydra built from
    a `_target_` with `_partial_: true` (`conf/optim/`), so any `torch.optim` class works."""

    optimizer: Callable[..., Any]
    scheduler: Callable[..., Any] | None = None

    @classmethod
    def from_config(cls, node: Mapping | None) -> Optim:
        node = dict(node or {})
        return cls(instantiate(node["optimizer"]),
                   instantiate(node["scheduler"]) if node.get("scheduler") else None)

    def scaled(self, lr_scale: float) -> Optim:
        """The same optimiser at `lr_scale` times its learning rate (fine-tuning after compression)."""
        if lr_scale == 1.0:
            return self
        lr = self.optimizer.keywords.get("lr") if isinstance(self.optimizer, functools.partial) else None
        if lr is None:
            raise ValueError(f"cannot scale the learning rate of {self.optimizer}: give it an explicit `lr`")
        return Optim(functools.partial(self.optimizer, lr=float(lr) * lr_scale), self.scheduler)

    def configure(self, params, max_epochs: int) -> Any:
        """What `LightningModule.configure_optimizers` returns."""
        opt = self.optimizer(params)
        if self.scheduler is None:
            return opt
        scheduler = self.scheduler
        if isinstance(scheduler, functools.partial):
            length = {k: max(1, int(max_epochs)) for k in SCHEDULE_LENGTH_KEYS
                      if k in scheduler.keywords and scheduler.keywords[k] is None}
            scheduler = functools.partial(scheduler, **length)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "epoch"}}


class ChannelsLast(Callback):
    """Puts the module's 4-D weights (convolutions, with the teacher of a distillation module) in
    channels-last layout before the optimisers are built: every later activation follows, and a
    training step of a CPU convolutional net is 1.3-1.45x faster alone, 1.2x with two jobs on two
    cores (scripts/bench_channels_last.py, docs/scale.md). The values are the same; checkpoints and
    saved models load into either layout. Other weights are untouched, so a model without
    convolutions trains as before."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.to(memory_format=torch.channels_last)


class StageRunLogger(MLFlowLogger):
    """Lightning's MLflow logger on the stage's run, which the stage (not each fit) ends: Lightning
    marks the run FINISHED when a fit ends, so a stage of several fits (a chain, born-again
    generations) killed in its second fit would look finished and its resume would be missed."""

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Nothing to do: the stage's `mlflow.start_run` context sets the run's final status."""


@dataclass
class Fitter:
    """Runs the Lightning fits of one stage run. Each fit has a name (`student`, `ta1`, `gen2`,
    `member0`...) and checkpoints into `checkpoint_root/<stage key>/<name>/`, so after a kill the
    same command resumes every fit where it stopped: finished fits restore their last epoch and
    train no further, the interrupted one goes on from its last epoch."""

    stage: str
    key: str
    run_id: str
    tracking_uri: str
    datamodule: Any
    workdir: Path
    trainer_kwargs: dict[str, Any]
    checkpoint_root: str
    callbacks: Mapping[str, Any] = field(default_factory=dict)  # config of user callbacks, by name
    resume: bool = True
    interrupted: list[Run] = field(default_factory=list)  # runs of killed jobs of this stage, newest first

    def checkpoint_key(self, name: str) -> str:
        return f"{self.key}/{name}"

    def user_callbacks(self) -> list[Callback]:
        """Fresh instances of the `callbacks` config entries (a callback keeps state per fit)."""
        return [instantiate(spec) for spec in self.callbacks.values() if spec]

    def trainer(self, name: str, max_epochs: int, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
        """A Lightning Trainer whose per-epoch curves go to the stage's MLflow run."""
        logger = StageRunLogger(tracking_uri=self.tracking_uri, run_id=self.run_id)
        ckpt = ModelCheckpoint(dirpath=checkpoint_dir(self.checkpoint_root, self.checkpoint_key(name)),
                               save_last=True, save_top_k=1)  # top 1 = the newest epoch
        kwargs = dict(self.trainer_kwargs)
        layout = [ChannelsLast()] if kwargs.pop("channels_last", False) else []  # kdpipe's key
        return pl.Trainer(**{**kwargs, "max_epochs": int(max_epochs)}, logger=logger,
                          callbacks=[ckpt, *layout, *callbacks, *self.user_callbacks()],
                          default_root_dir=str(self.workdir))

    def fit(self, module: pl.LightningModule, name: str, max_epochs: int, callbacks: Sequence[Callback] = (),
            train_loader: DataLoader | None = None, resumable: bool = True) -> pl.Trainer:
        """Fit on the data module (or on `train_loader`, e.g. batches that carry cached teacher
        logits), resuming from the checkpoint an interrupted run of this fit left. A fit that
        changes the model's structure as it goes (pruning) passes `resumable=False`."""
        trainer = self.trainer(name, max_epochs, callbacks)
        module.task_ranges = getattr(self.datamodule, "task_ranges", None)  # per-task val metrics
        ckpt = resume_from(self.checkpoint_root, self.checkpoint_key(name), f"{self.stage}/{name}",
                           max_epochs, self.interrupted) if (self.resume and resumable) else None
        stop_if_terminated()
        try:
            if train_loader is None:
                trainer.fit(module, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)
            else:
                trainer.fit(module, train_dataloaders=train_loader,
                            val_dataloaders=self.datamodule.val_dataloader(), ckpt_path=ckpt,
                            weights_only=True)
        except FloatingPointError as exc:  # a diverged loss: say which stage, keep the term and epoch
            raise FloatingPointError(f"stage {self.stage}, fit {name}: {exc}") from exc
        stop_if_terminated()  # SIGTERM during validation, or after the last batch
        return trainer


def val_acc(trainer: pl.Trainer) -> float:
    """The last `val/acc` a fit logged (NaN when it validated nothing)."""
    return float(trainer.callback_metrics.get("val/acc", float("nan")))

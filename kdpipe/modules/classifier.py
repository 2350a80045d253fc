"""Supervised training of one classifier on hard labels: the teacher stage, the `distill=none`
baseline, and the base of the distillation module."""

from __future__ import annotations

import functools

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kdpipe.exits.model import exit_terms
from kdpipe.losses.base import label_cross_entropy
from kdpipe.losses.token import token_rows
from kdpipe.models.multitask import task_rows
from kdpipe.training import Optim


class ClassifierModule(pl.LightningModule):
    """Holds one model, its optimiser settings and its metrics.

    Logs per epoch `train/loss`, `val/loss`, `val/acc`, and `test/acc` on `trainer.test`. A language
    model (logits `(B, L, V)`, next-token targets `(B, L)`) is trained and measured per real token:
    accuracy is next-token accuracy, and `val/ppl` its perplexity.
    Subclasses override `training_loss` to return named loss terms; their sum is the loss.
    """

    # multi-task data (kdpipe.data.text.MultiTaskTextDataModule): task -> its global class range;
    # set by the Fitter from the data module, so every module logs per-task metrics
    task_ranges: dict[str, tuple[int, int]] | None = None

    def __init__(self, model: nn.Module, num_classes: int, optim: Optim | None = None,
                 augment: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.augment = augment  # batch augmentation (kdpipe.data.augment), training batches only
        self.optim = optim or Optim(functools.partial(torch.optim.AdamW, lr=1e-3))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_nll = MeanMetric()  # token-weighted: a language model's perplexity is exp of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment on the device, before the step: whatever the step runs (student, teacher,
        peers) sees this one view."""
        if self.augment is not None and self.trainer.training:
            x, y, *rest = batch
            batch = (*self.augment(x, y), *rest)
        return batch

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ce": label_cross_entropy(*token_rows(self.model(x), y))}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self._exit_teacher = None
        terms = self.training_loss(x, y)
        terms.update(exit_terms(self, y, self._exit_teacher))  # a student with early exits: their heads
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["total"]
            raise FloatingPointError(
                f"loss term(s) {', '.join(bad)} became {loss.item()} at epoch {self.current_epoch}, "
                f"step {self.global_step}; lower the learning rate or check the loss weights"
            )
        bs = x.shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs,
                 sync_dist=True)
        for name, value in terms.items():  # every term its own curve, also a single one
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        logits, y = token_rows(self(batch[0]), batch[1])  # a language model: one row per real token
        self.val_acc(logits, y)
        loss = F.cross_entropy(logits, y)
        self.log("val/loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(y))
        if batch[1].dim() == 2:  # next-token targets
            self.val_nll.update(loss.detach(), len(y))
        for name, rows in task_rows(y, self.task_ranges):  # multi-task data: each task's own
            part, target, n = logits[rows], y[rows], int(rows.sum())
            acc = (part.argmax(-1) == target).float().mean()
            self.log(f"val/acc_{name}", acc, on_epoch=True, batch_size=n, sync_dist=True)
            self.log(f"val/loss_{name}", F.cross_entropy(part, target), on_epoch=True, batch_size=n,
                     sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.val_nll.update_count:
            self.log("val/ppl", torch.exp(self.val_nll.compute().clamp_max(50.0)))
        self.val_nll.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        logits, y = token_rows(self(batch[0]), batch[1])
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc, on_epoch=True, batch_size=len(y))

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return self.optim.configure(self.trainable_parameters(), int(self.trainer.max_epochs or 1))

"""Offline distillation: a student trained against a frozen teacher."""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.losses.base import DistillOutputs, WeightedSum, find_module
from kdpipe.losses.token import TopK, token_rows
from kdpipe.modules.classifier import ClassifierModule
from kdpipe.training import Optim


class FeatureHooks:
    """Captures the outputs of named submodules with forward hooks, so any `nn.Module` can
    serve as teacher or student without editing its `forward`."""

    def __init__(self, model: nn.Module, paths: tuple[str, ...], role: str) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in paths:
            module = find_module(model, path, role)
            self._handles.append(module.register_forward_hook(self._make_hook(path)))

    def _make_hook(self, path: str):
        def hook(_module, _inputs, output):
            self.features[path] = output
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        feats, self.features = self.features, {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *_exc) -> None:
        self.remove()


class DistillationModule(ClassifierModule):
    """Student + frozen teacher (eval mode, no gradients) + a `WeightedSum` of loss terms.

    The teacher is a registered submodule so it follows the student to the device, but its
    parameters are frozen and `train()` never takes it out of eval mode (BatchNorm statistics
    and dropout of a trained teacher must not change while distilling).

    `cached_layers`: the teacher layers whose outputs the training batches carry after the teacher's
    logits (kdpipe.distill.cache), so that the teacher never runs while training.
    """

    cached_layers: tuple[str, ...] = ()

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: WeightedSum, num_classes: int,
                 example_input: torch.Tensor, optim: Optim | None = None,
                 augment: nn.Module | None = None) -> None:
        super().__init__(student, num_classes, optim, augment)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss = loss
        self.loss.setup(student, teacher, example_input)
        self.student_hooks = FeatureHooks(student, tuple(loss.student_layers), "student")
        self.teacher_hooks = FeatureHooks(teacher, tuple(loss.teacher_layers), "teacher")
        self._cached = None  # (logits, features) of the batch `unpack` read last, when it carried them

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment is not None and self.trainer.training and len(batch) > 2:
            raise RuntimeError("a training batch carries cached teacher outputs and is augmented: they are "
                               "the un-augmented images' outputs; a scheme must not cache them when it "
                               "augments (kdpipe.distill.cache.cache_blockers)")
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return super().training_step(self.unpack(batch), batch_idx)

    def unpack(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of a batch; the teacher outputs a cached batch carries after them (kdpipe.distill.cache:
        the logits, or a language model's top-k values and ids, then `cached_layers`) are kept for
        the next `training_loss`."""
        if len(batch) > 2:
            x, y, *columns = batch
            k = len(columns) - len(self.cached_layers)
            logits = columns[0] if k == 1 else TopK(*columns[:k])
            self._cached = (logits, dict(zip(self.cached_layers, columns[k:], strict=True)))
            return x, y
        return batch

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        cached, self._cached = self._cached, None
        if cached is not None:
            teacher_logits, teacher_features = cached  # the teacher does not run at all
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            teacher_features = self.teacher_hooks.pop()
        # a language model's outputs become one row per real token (padding dropped)
        student_logits, y, teacher_logits = token_rows(self.model(x), y, teacher_logits)
        self._exit_teacher = teacher_logits  # early exits of the student may learn from it too
        out = DistillOutputs(student_logits, teacher_logits, y, self.student_hooks.pop(), teacher_features)
        return self.loss(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self.student_hooks.pop()
        return logits

"""The contract between the distillation module and a loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DistillOutputs:
    """What one training step saw: logits of both models, the hard labels, and the
    intermediate features captured by forward hooks on the layers a loss asked for."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    target: torch.Tensor
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class. A loss lists the module paths it needs (`student_layers`,
    `teacher_layers`); `setup` is called once with both models and an example batch before
    training, which is where adapters whose shapes depend on the models are built."""

    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    needs_teacher: bool = True

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        """Build whatever depends on the models' shapes. The default needs nothing."""

    def forward(self, out: DistillOutputs) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must implement forward(out) -> dict of loss terms")

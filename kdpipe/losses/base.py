"""The contract between the distillation module and a loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kdpipe.errors import ConfigError


def find_module(model: nn.Module, path: str, role: str) -> nn.Module:
    """The submodule at `path` (e.g. `features.2`, `layer3`), or a clear error listing the
    valid paths."""
    modules = dict(model.named_modules())
    if path not in modules:
        valid = ", ".join(name for name in modules if name) or "(none)"
        raise ConfigError(f"{role} has no layer {path!r}; valid module paths: {valid}")
    return modules[path]


def as_layers(layers) -> tuple[str, ...]:
    """One module path or a list of them, as a tuple."""
    return (layers,) if isinstance(layers, str) else tuple(layers)


def layer_pairs(student_layers, teacher_layers, scheme: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Paired module paths (one teacher layer per student layer), or a clear error."""
    s, t = as_layers(student_layers), as_layers(teacher_layers)
    if len(s) != len(t) or not s:
        raise ConfigError(f"distill.student_layers has {len(s)} entries and distill.teacher_layers {len(t)}: "
                          f"{scheme} needs one teacher layer per student layer")
    return s, t


def probe_shapes(model: nn.Module, paths: tuple[str, ...], example: torch.Tensor, role: str) -> dict[str, torch.Size]:
    """The output shape of each named layer on `example`: how adapters are sized from the
    models themselves, never from numbers the user types."""
    shapes: dict[str, torch.Size] = {}
    handles = [find_module(model, p, role).register_forward_hook(
        lambda _m, _i, o, p=p: shapes.__setitem__(p, o.shape)) for p in paths]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


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

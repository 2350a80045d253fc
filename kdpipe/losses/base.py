"""The contract between the distillation module and its loss: named terms, summed with weights.

A term is one idea (CE, KD, a hint, attention transfer, ...): an `nn.Module` whose
`forward(out: DistillOutputs)` returns one unweighted scalar. It names the layers it reads
(`student_layers`, `teacher_layers`: module paths captured by forward hooks) and may build
adapters sized from the models in `setup`. `WeightedSum` is the loss: `distill.terms` in config,
a mapping `name -> {_target_, weight, <the term's keys>}` (torchdistill's weighted sum of named
sub-losses, with Hydra's `_target_` instead of a private registry). A user's own term is any
class with that `forward`, given by its import path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdpipe import limits
from kdpipe.data.base import UNLABELED
from kdpipe.errors import ConfigError, build


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
    if layers is None:
        return ()
    return (layers,) if isinstance(layers, str) else tuple(layers)


def layer_pairs(student_layers, teacher_layers, term: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Paired module paths (one teacher layer per student layer), or a clear error."""
    s, t = as_layers(student_layers), as_layers(teacher_layers)
    if len(s) != len(t) or not s:
        raise ConfigError(f"{term}: student_layers has {len(s)} entries and teacher_layers {len(t)}; "
                          f"give one teacher layer per student layer")
    return s, t


def probe_shapes(model: nn.Module, paths: tuple[str, ...], example: torch.Tensor,
                 role: str) -> dict[str, torch.Size]:
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


def label_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the labels a batch has: class indices, where `UNLABELED` rows are
    skipped (`data.labeled_fraction` < 1), or rows of class probabilities (mixup and cutmix mix
    two labels; an unlabeled image's row is zero), averaged over the label mass. A batch without
    any label gives 0, not NaN."""
    if target.dtype.is_floating_point:
        mass = target.sum()
        if mass <= 0:
            return logits.sum() * 0.0
        return -(target * F.log_softmax(logits, dim=-1)).sum() / mass
    labeled = target != UNLABELED
    if not bool(labeled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labeled], target[labeled])


def hard_labels(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that have a label, their class index) for terms defined on one target class
    (DKD): hidden labels are left out; a mixed label counts as its larger share."""
    if target.dtype.is_floating_point:
        rows = target.sum(-1) > 0
        return rows, target.argmax(-1)[rows]
    rows = target != UNLABELED
    return rows, target[rows]


@dataclass
class DistillOutputs:
    """What one training step saw: logits of both models, the hard labels, and the
    intermediate features captured by forward hooks on the layers the terms asked for."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    target: torch.Tensor
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


class LossTerm(nn.Module):
    """Base class of a term (subclassing it is optional: any module with the same attributes
    and `forward` works). `needs_teacher` False: the term reads only the student and labels."""

    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    needs_teacher: bool = True

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        """Build whatever depends on the models' shapes (adapters). The default needs nothing."""

    def forward(self, out: DistillOutputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must implement forward(out) -> a scalar tensor")


class WeightedSum(nn.Module):
    """The distillation loss: `sum_i w_i * term_i(out)`, each weighted term returned by name so the
    training module logs it as `train/loss_<name>`. A term of weight 0 is not built at all: it
    adds nothing to the sum and no hook on the layers it would read."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float]) -> None:
        super().__init__()
        if not terms:
            raise ConfigError("distill.terms is empty: give at least one loss term, e.g. "
                              "distill.terms.ce={_target_:kdpipe.losses.CrossEntropy,weight:1}")
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    @classmethod
    def from_config(cls, terms: Mapping | DictConfig | None) -> WeightedSum:
        """Instantiate `distill.terms`: `{name: {_target_, weight, ...}}`."""
        if isinstance(terms, DictConfig):
            terms = OmegaConf.to_container(terms, resolve=True)
        built, weights = {}, {}
        for name, spec in (terms or {}).items():
            if spec is None:  # a term a scheme file removes from the one it extends (`kd: null`)
                continue
            if not isinstance(spec, Mapping) or "_target_" not in spec:
                raise ConfigError(f"distill.terms.{name} must be a mapping with a _target_ "
                                  f"(the term's class) and a weight, got {spec!r}")
            spec = dict(spec)
            weight = limits.weight(spec.pop("weight", 1.0), f"distill.terms.{name}.weight")
            if weight == 0:
                continue
            term = build(spec, f"distill.terms.{name}")
            if not callable(getattr(term, "forward", None)):
                raise ConfigError(f"distill.terms.{name}: {spec['_target_']} is not a module "
                                  "with forward(out)")
            built[name], weights[name] = term, weight
        return cls(built, weights)

    @property
    def student_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms.values() for p in getattr(t, "student_layers", ())))

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for t in self.terms.values() for p in getattr(t, "teacher_layers", ())))

    @property
    def needs_teacher(self) -> bool:
        return any(getattr(t, "needs_teacher", True) for t in self.terms.values())

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        for term in self.terms.values():
            if hasattr(term, "setup"):
                term.setup(student, teacher, example)

    def forward(self, out: DistillOutputs) -> dict[str, torch.Tensor]:
        return {name: self.weights[name] * term(out) for name, term in self.terms.items()}

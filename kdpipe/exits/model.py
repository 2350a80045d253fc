"""Early-exit networks (BranchyNet, Teerapittayanon, McDanel & Kung 2016): classifier heads on
shallow blocks of a student, so that an input the shallow head is sure of needs no more blocks.

`with_exits(model, exits=[features.0, features.1])` cuts a chain of `nn.Sequential` containers
(kdpipe's `cnn` and `mlp`, or a user's) into segments that end at the named module paths and puts a
small head after each cut. The network keeps the backbone's module paths (`features.1` still names
the same block, so feature losses and pruning `ignore` lists are unchanged) and its `forward` is the
full-depth network: every stage trains, prunes, quantizes and measures it as before. In training
mode the heads run too and their logits wait in `pending` for `exit_terms`, which every Lightning
module of kdpipe adds to its loss: the exits learn from the labels, from the network's own final
head and, when there is one, from the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdpipe.errors import ConfigError
from kdpipe.losses.base import label_cross_entropy
from kdpipe.losses.response import soft_kl

DEFAULT_LOSS = {"ce": 1.0, "self": 1.0, "teacher": 1.0, "temperature": 2.0}


def chain_units(model: nn.Module, prefix: str = "") -> list[str]:
    """The module paths of a chain of nested `nn.Sequential` containers, innermost leaves first to
    last, in the order `forward` runs them."""
    units = []
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        units += chain_units(child, path) if isinstance(child, nn.Sequential) else [path]
    return units


def exit_head(in_shape: torch.Size, num_classes: int, width: int | None = None) -> nn.Module:
    """A small classifier on one block's output: 1x1 conv-BN-ReLU, global average pooling and a
    linear layer on feature maps; linear-ReLU-linear on vectors. `width`: the hidden channels
    (default: the block's own)."""
    if len(in_shape) == 4:
        c = int(in_shape[1])
        w = int(width or c)
        return nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, num_classes))
    n = int(in_shape[1:].numel())
    w = int(width or min(n, 128))
    return nn.Sequential(nn.Flatten(), nn.Linear(n, w), nn.ReLU(), nn.Linear(w, num_classes))


class EarlyExitNet(nn.Module):
    """A backbone cut into `segments` at the exit paths, with one head per exit.

    The backbone's top-level children become this module's own (same names, same state-dict keys);
    `exits` holds the heads. `forward` runs the whole depth and returns the final logits;
    `forward_all` returns every exit's logits and the final ones; `segment(i)` is the piece a
    runtime runs to reach exit i (`kdpipe.exits.runtime`)."""

    def __init__(self, backbone: nn.Module, exits: Sequence[str], num_classes: int,
                 example: torch.Tensor, head_width: int | None = None,
                 loss: dict[str, float] | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Sequential):
            raise ConfigError(f"student.exits needs a model whose forward runs its blocks in order, built of "
                              f"nn.Sequential containers (kdpipe.models.cnn, mlp); "
                              f"{type(backbone).__name__} is not one. Give a Sequential model or "
                              f"student.exits=[]")
        units = chain_units(backbone)
        cuts = []
        for path in exits:
            inside = [i for i, u in enumerate(units) if u == path or u.startswith(path + ".")]
            if not inside:
                raise ConfigError(f"student.exits: {path!r} is not a block of the student's chain; "
                                  f"valid paths: {', '.join(units)}")
            if inside[-1] >= len(units) - 1:
                raise ConfigError(f"student.exits: {path!r} ends at the network's output; an exit there is "
                                  f"the final head. Name an earlier block")
            cuts.append(inside[-1] + 1)
        if cuts != sorted(set(cuts)):
            raise ConfigError(f"student.exits={list(exits)} must name different blocks, shallowest first")
        for name, child in backbone.named_children():
            self.add_module(name, child)
        bounds = [0, *cuts, len(units)]
        self.segments = [units[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        self.exit_paths = [str(p) for p in exits]
        self.loss = {**DEFAULT_LOSS, **(loss or {})}
        with torch.no_grad():
            shapes = self._shapes(example)
        self.exits = nn.ModuleList(exit_head(s, num_classes, head_width) for s in shapes)
        self.pending: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def _shapes(self, x: torch.Tensor) -> list[torch.Size]:
        was = self.training
        self.eval()
        shapes = []
        for seg in self.segments[:-1]:
            x = self._run_units(seg, x)
            shapes.append(x.shape)
        self.train(was)
        return shapes

    def _run_units(self, paths: list[str], x: torch.Tensor) -> torch.Tensor:
        for path in paths:
            x = self.get_submodule(path)(x)
        return x

    def _run(self, x: torch.Tensor, heads: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        outs = []
        for i, seg in enumerate(self.segments):
            x = self._run_units(seg, x)
            if heads and i < len(self.exits):
                outs.append(self.exits[i](x))
        return outs, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exits, logits = self._run(x, heads=self.training)
        if self.training:
            self.pending = (exits, logits)
        return logits

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, shallowest first, then the final logits."""
        exits, logits = self._run(x, heads=True)
        return [*exits, logits]

    def segment(self, i: int) -> nn.Module:
        """Segment i as a module of its own (it shares the weights): input -> (block output, exit i's
        logits) before the last exit, input -> final logits for the last segment."""
        return Segment(self, i)


class Segment(nn.Module):
    def __init__(self, net: EarlyExitNet, i: int) -> None:
        super().__init__()
        self.units = nn.ModuleList(net.get_submodule(p) for p in net.segments[i])
        self.head = net.exits[i] if i < len(net.exits) else None

    def forward(self, x: torch.Tensor):
        for unit in self.units:
            x = unit(x)
        return x if self.head is None else (x, self.head(x))


def with_exits(model: dict[str, Any] | nn.Module, exits: Sequence[str], num_classes: int,
               in_shape: Sequence[int], head_width: int | None = None,
               loss: dict[str, float] | None = None) -> EarlyExitNet:
    """The model factory of a student with `student.exits` (its arch in the model file): the
    backbone built from its own config, cut at `exits`. `loss`: weights of the exits' terms
    (`ce`: hard labels, `self`: the final head, `teacher`: the teacher) and their `temperature`."""
    if isinstance(model, dict):
        from kdpipe.models.io import build_model

        model = build_model(model)
    example = torch.zeros(2, *[int(d) for d in in_shape])
    return EarlyExitNet(model, exits, num_classes, example, head_width, loss)


def exit_terms(module: nn.Module, y: torch.Tensor,
               teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The loss terms of every early-exit network inside `module` that ran a training forward:
    `exit_ce` (hard labels), `exit_self` (KL to the network's own final head, detached, at T) and,
    with a teacher, `exit_teacher` (KL to its logits at T); each summed over the exits."""
    terms: dict[str, torch.Tensor] = {}
    for net in module.modules():
        if not isinstance(net, EarlyExitNet) or net.pending is None:
            continue
        (exits, final), net.pending = net.pending, None
        w, t = net.loss, float(net.loss["temperature"])
        targets = {"exit_ce": None, "exit_self": final.detach()}
        if teacher_logits is not None:
            targets["exit_teacher"] = teacher_logits.detach()
        for name, target in targets.items():
            weight = float(w[name.removeprefix("exit_")])
            if weight <= 0:
                continue
            value = weight * sum(label_cross_entropy(z, y) if target is None else soft_kl(z, target, t)
                                 for z in exits)
            terms[name] = terms[name] + value if name in terms else value
    return terms


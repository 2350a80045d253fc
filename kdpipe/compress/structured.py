"""Structured pruning that really removes filters and channels, with Torch-Pruning's
dependency graph (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning"): a conv's output
channels are removed together with the batch-norm channels, the next layer's input channels
and every layer tied to them through a residual addition, so the pruned network stays valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn

# Importance criteria, by config name: how a group of coupled channels is scored.
IMPORTANCE: dict[str, Callable[[], object]] = {
    # L1 norm of the filters (Li et al. 2017, "Pruning Filters for Efficient ConvNets", sec. 3.1)
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    # first-order Taylor estimate of the loss change |w * dL/dw| (Molchanov et al. 2019, eq. 8)
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    # distance to the geometric median of the layer's filters (He et al. 2019, "FPGM", eq. 4)
    "fpgm": lambda: tp.importance.FPGMImportance(),
    # batch-norm scale |gamma| (Liu et al. 2017, "Network Slimming")
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
}

# Module attributes that describe a layer's width, rebuilt from the saved weights' shapes.
_WIDTH_ATTRS = {
    nn.Conv1d: ("out_channels", "in_channels"), nn.Conv2d: ("out_channels", "in_channels"),
    nn.Linear: ("out_features", "in_features"),
}


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Paths of the layers whose outputs are the logits (the classifier): never pruned, or the
    model would predict fewer classes."""
    with torch.no_grad():
        n_out = model.eval()(example[:1]).shape[-1]
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_out]
    return [linears[-1][0]] if linears else []


class StructuredPruner:
    """Steps a Torch-Pruning `MetaPruner` through a list of channel-pruning ratios (one per
    step of a schedule), each relative to the original width of every layer."""

    def __init__(self, model: nn.Module, example: torch.Tensor, targets: Sequence[float],
                 importance: str = "magnitude", ignore: Sequence[str] | None = None,
                 global_pruning: bool = False, grad_batches: Callable[[], None] | None = None) -> None:
        if importance not in IMPORTANCE:
            raise ValueError(f"prune.importance={importance!r}; use one of {', '.join(IMPORTANCE)}")
        modules = dict(model.named_modules())
        paths = list(ignore) if ignore else output_layers(model, example)
        unknown = [p for p in paths if p not in modules]
        if unknown:
            raise ValueError(f"prune.ignore names no layer {unknown}; valid module paths: "
                             f"{', '.join(n for n in modules if n)}")
        self.model, self.example, self.ignored = model, example[:1], paths
        self.importance_name = importance
        self.grad_batches = grad_batches
        targets = [float(t) for t in targets]
        self.pruner = tp.pruner.MetaPruner(
            model, self.example, importance=IMPORTANCE[importance](), global_pruning=global_pruning,
            pruning_ratio=targets[-1], iterative_steps=len(targets),
            iterative_pruning_ratio_scheduler=lambda _ratio, _steps: [0.0, *targets],
            ignored_layers=[modules[p] for p in paths],
        )

    def step(self) -> None:
        """Remove the channels of the next step. Taylor importance needs gradients: they are
        accumulated on a few training batches first."""
        self.model.eval()
        if self.importance_name == "taylor":
            self.model.zero_grad()
            if self.grad_batches is None:
                raise ValueError("prune.importance=taylor needs training batches for gradients")
            self.grad_batches()
        self.pruner.step()
        self.model.zero_grad(set_to_none=True)


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Shrink a freshly built (unpruned) model to the shapes of a structurally pruned model's
    weights, so `load_state_dict` fits: parameters and buffers are replaced by tensors of the
    saved shapes and the width attributes (`out_channels`, `num_features`...) follow."""
    for key, tensor in state_dict.items():
        path, _, attr = key.rpartition(".")
        module = model.get_submodule(path) if path else model
        current = getattr(module, attr, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad))
        else:
            module.register_buffer(attr, torch.empty_like(tensor))
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = tensor.shape[0]
        for cls, (out_attr, in_attr) in _WIDTH_ATTRS.items():
            if isinstance(module, cls) and attr == "weight":
                setattr(module, out_attr, tensor.shape[0])
                groups = getattr(module, "groups", 1)
                setattr(module, in_attr, tensor.shape[1] * groups)
    return model


def export_plain_module(model: nn.Module, example: torch.Tensor, path) -> None:
    """Save the pruned network as a `torch.export` program: `torch.export.load(path).module()`
    runs it in any process with torch alone, without kdpipe or the original model code."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, str(path))

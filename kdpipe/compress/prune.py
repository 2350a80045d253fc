"""Unstructured magnitude pruning with `torch.nn.utils.prune`."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Conv2d, nn.Linear, nn.Conv1d)


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def magnitude_prune(model: nn.Module, amount: float, scope: str = "global") -> None:
    """Zero the `amount` fraction of conv/linear weights with the smallest |w| (Han et al. 2015,
    "Learning both Weights and Connections"). `scope=global` ranks all layers together,
    `layer` prunes each layer by `amount`. Leaves the masks in place for fine-tuning;
    `make_permanent` removes them."""
    params = prunable_weights(model)
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    elif scope == "layer":
        for module, name in params:
            prune.l1_unstructured(module, name, amount=amount)
    else:
        raise ValueError(f"prune.scope={scope!r}; use global or layer")


def make_permanent(model: nn.Module) -> None:
    """Fold masks into the weights (`weight = weight_orig * mask`) and drop the reparametrisation."""
    for module, name in prunable_weights(model):
        if prune.is_pruned(module):
            prune.remove(module, name)


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the prunable layers."""
    total = zeros = 0
    for module, name in prunable_weights(model):
        w = getattr(module, name)
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / max(total, 1)


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            w = module.weight
            out[path] = float((w == 0).sum()) / w.numel()
    return out

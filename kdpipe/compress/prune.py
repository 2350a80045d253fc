"""Unstructured magnitude pruning with `torch.nn.utils.prune`, stepped to exact sparsities."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Conv2d, nn.Linear, nn.Conv1d)


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def _masked_zeros(module: nn.Module, name: str) -> int:
    mask = getattr(module, name + "_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def magnitude_prune(model: nn.Module, amount: float, scope: str = "global") -> None:
    """Mask the conv/linear weights with the smallest |w| until exactly `amount` of them are zero
    (Han et al. 2015, "Learning both Weights and Connections", L1 magnitude criterion).

    `scope=global` ranks all layers together (layers that matter less lose more), `layer` prunes
    each layer to `amount`. Called again with a higher `amount`, it only adds to the masks
    already in place: that is what makes iterative and gradual schedules monotone. The weights
    stay reparametrised (`weight_orig * weight_mask`) so fine-tuning keeps pruned weights at
    zero, and the parameter object is the one an optimizer already holds; `make_permanent`
    folds the masks in."""
    params = prunable_weights(model)
    if scope == "global":
        total = sum(getattr(m, n).numel() for m, n in params)
        extra = round(amount * total) - sum(_masked_zeros(m, n) for m, n in params)
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=max(int(extra), 0))
    elif scope == "layer":
        for module, name in params:
            extra = round(amount * getattr(module, name).numel()) - _masked_zeros(module, name)
            prune.l1_unstructured(module, name, amount=max(int(extra), 0))
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


def layer_table(model: nn.Module) -> list[dict]:
    """One row per conv/linear layer: its shape, weights, zeros and sparsity (the per-layer
    table artefact of the prune stage)."""
    rows = []
    for path, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            w = module.weight
            zeros = int((w == 0).sum())
            rows.append({"layer": path, "shape": "x".join(map(str, w.shape)), "weights": w.numel(),
                         "zeros": zeros, "sparsity": round(zeros / w.numel(), 6)})
    return rows

"""Unstructured magnitude pruning with `torch.nn.utils.prune`, stepped to exact sparsities."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from kdpipe.errors import ConfigError

PRUNABLE = (nn.Conv2d, nn.Linear, nn.Conv1d)
SCOPES = ("global", "layer")


def prunable_weights(model: nn.Module, ignore: tuple[str, ...] = ()) -> list[tuple[nn.Module, str]]:
    """The conv/linear weights, but those of the module paths in `ignore`."""
    return [(m, "weight") for path, m in model.named_modules()
            if isinstance(m, PRUNABLE) and path not in ignore]


def _masked_zeros(module: nn.Module, name: str) -> int:
    mask = getattr(module, name + "_mask", None)
    return 0 if mask is None else int((mask == 0).sum())


def _contiguous(params: list[tuple[nn.Module, str]]) -> None:
    """Put each weight (and its `_orig` and `_mask` once pruned) in torch's default layout, in place:
    `prune.global_unstructured` flattens them with `view`, which a channels-last weight refuses
    (`trainer.channels_last`). The parameter objects stay the ones an optimizer holds."""
    for module, name in params:
        for attr in (name, name + "_orig", name + "_mask"):
            t = getattr(module, attr, None)
            if t is None or t.is_contiguous():
                continue
            if isinstance(t, nn.Parameter) or attr in module._buffers:
                t.data = t.data.contiguous()
            else:  # the masked weight a pruned module recomputes before each forward
                setattr(module, attr, t.contiguous())


def magnitude_prune(model: nn.Module, amount: float, scope: str = "global",
                    ignore: tuple[str, ...] = ()) -> None:
    """Mask the conv/linear weights with the smallest |w| until exactly `amount` of them are zero
    (Han et al. 2015, "Learning both Weights and Connections", L1 magnitude criterion).

    `scope=global` ranks all layers together (layers that matter less lose more), `layer` prunes
    each layer to `amount`. Called again with a higher `amount`, it only adds to the masks
    already in place: that is what makes iterative and gradual schedules monotone. The weights
    stay reparametrised (`weight_orig * weight_mask`) so fine-tuning keeps pruned weights at
    zero, and the parameter object is the one an optimizer already holds; `make_permanent`
    folds the masks in. Layers in `ignore` (module paths) are left whole."""
    params = prunable_weights(model, ignore)
    _contiguous(params)
    if scope == "global":
        total = sum(getattr(m, n).numel() for m, n in params)
        extra = round(amount * total) - sum(_masked_zeros(m, n) for m, n in params)
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=max(int(extra), 0))
    elif scope == "layer":
        for module, name in params:
            extra = round(amount * getattr(module, name).numel()) - _masked_zeros(module, name)
            prune.l1_unstructured(module, name, amount=max(int(extra), 0))
    else:
        raise ValueError(f"scope={scope!r}; use global or layer")


class MagnitudePruner:
    """`magnitude_prune` as a pruner: `step(target)` masks the smallest |w| (Han et al. 2015)
    until exactly `target` of the conv/linear weights are zero, over all layers or per layer
    (`scope`). The masks stay on while fine-tuning and the optimizer's parameters stay the same
    (not `structural`); `finalize` folds them in. `example_inputs`, part of every pruner's
    constructor, is unused here."""

    structural = False

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor | None = None,
                 scope: str = "global", ignore: list[str] | None = None) -> None:
        if scope not in SCOPES:
            raise ConfigError(f"prune.pruner.scope={scope} must be global (rank all layers together) "
                              "or layer")
        modules = dict(model.named_modules())
        unknown = [p for p in ignore or [] if p not in modules]
        if unknown:
            raise ConfigError(f"prune.pruner.ignore names no layer {unknown}; valid module paths: "
                              f"{', '.join(n for n in modules if n)}")
        self.model, self.scope, self.ignored = model, scope, tuple(ignore or ())

    def step(self, target: float) -> None:
        magnitude_prune(self.model, target, self.scope, self.ignored)

    def sparsity(self) -> float:
        return sparsity(self.model)

    def finalize(self) -> None:
        make_permanent(self.model)


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

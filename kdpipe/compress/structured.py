"""Structured pruning that really removes filters and channels, with Torch-Pruning's
dependency graph (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning"): a conv's output
channels are removed together with the batch-norm channels, the next layer's input channels
and every layer tied to them through a residual addition, so the pruned network stays valid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from kdpipe.compress.importance import Magnitude, needs_gradients
from kdpipe.compress.prune import PRUNABLE
from kdpipe.errors import ConfigError

# Module attributes that describe a layer's width, rebuilt from the saved weights' shapes.
_WIDTH_ATTRS = {
    nn.Conv1d: ("out_channels", "in_channels"), nn.Conv2d: ("out_channels", "in_channels"),
    nn.Linear: ("out_features", "in_features"),
}


def output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Paths of the layers whose outputs are the logits (the classifier): never pruned, or the
    model would predict fewer classes."""
    was_training = model.training
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, p=p: outputs.__setitem__(p, o))
               for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            logits = model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [p for p, o in outputs.items() if o is logits]  # the layer whose output is returned


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """{query/key/value linear: head count} of every BERT self-attention block (transformers'
    `BertSelfAttention`, whose forward infers the head count from the projections' width), so
    Torch-Pruning removes whole heads. Empty for other models."""
    heads = {}
    for module in model.modules():
        if type(module).__name__ == "BertSelfAttention":
            for linear in (module.query, module.key, module.value):
                heads[linear] = int(module.num_attention_heads)
    return heads


def transformer_fixed_layers(model: nn.Module, heads: Mapping[nn.Module, int]) -> list[str]:
    """Paths of a transformer's layers whose outputs are the hidden width (embeddings, the attention
    and MLP output projections, the classifier): never pruned, so the residual stream keeps its width
    and only attention heads and MLP width go. A GPT-2 block's fused query/key/value projection is
    kept out of Torch-Pruning's graph too (GPT-2 splits its output along the last dimension, and
    Torch-Pruning maps channel indices through a split along dimension 1 only): its heads go
    through `prune_gpt2_heads` instead."""
    return [path for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding, *_conv1d())) and m not in heads
            and not path.endswith(("intermediate.dense", "mlp.c_fc"))]


def _conv1d() -> tuple[type, ...]:
    """transformers' `Conv1D` (GPT-2's linear layers, weight stored (in, out)), if installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def present_conv1d_as_transposed(model: nn.Module) -> None:
    """Give every GPT-2 `Conv1D` the attributes of a 1x1 transposed convolution, which computes the
    same thing with its weight stored (in, out): Torch-Pruning's conv pruner and every importance
    criterion then slice its weight along the right axis."""
    for m in model.modules():
        if isinstance(m, _conv1d()):
            m.in_channels, m.out_channels = m.weight.shape
            m.groups, m.transposed = 1, True


def sync_conv1d(model: nn.Module) -> None:
    """A `Conv1D` reads its output width from `nf`, and a GPT-2 attention splits its fused
    query/key/value output at `split_size`: follow the (pruned or loaded) weights."""
    for m in model.modules():
        if isinstance(m, _conv1d()):
            m.nx, m.nf = m.weight.shape
            m.in_channels, m.out_channels = m.weight.shape  # as present_conv1d_as_transposed says
    for attn in _gpt2_attentions(model).values():
        attn.split_size = attn.c_attn.weight.shape[1] // 3
        attn.num_heads = attn.split_size // attn.head_dim


def _gpt2_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """transformers' GPT-2 self-attention blocks, by module path."""
    return {path: m for path, m in model.named_modules() if type(m).__name__ == "GPT2Attention"}


def prune_gpt2_heads(attn: nn.Module, remove: int, gradients: bool) -> None:
    """Remove `remove` whole heads from one GPT-2 self-attention: a head's query, key and value
    columns of the fused `c_attn` (weight (in, 3 x width), split along its last axis) and the
    rows of `c_proj` that read its output. Heads are ranked by the squared magnitude of those
    weights, or, with `gradients`, by their first-order Taylor score |w * dL/dw| (what the
    `taylor` importance reads), summed per head; the lowest go."""
    hd, width = attn.head_dim, attn.split_size
    heads = width // hd
    remove = min(int(remove), heads - 1)
    if remove <= 0:
        return

    def score(w: torch.Tensor) -> torch.Tensor:
        g = w.grad if gradients else None
        return (w * g).abs() if g is not None else w.pow(2)

    with torch.no_grad():
        per_head = (score(attn.c_attn.weight).view(-1, 3, heads, hd).sum((0, 1, 3))
                    + score(attn.c_attn.bias).view(3, heads, hd).sum((0, 2))
                    + score(attn.c_proj.weight).view(heads, hd, -1).sum((1, 2)))
        kept = per_head.topk(heads - remove).indices.sort().values
        rows = (kept[:, None] * hd + torch.arange(hd)).flatten()  # the kept heads' channels, in order
        cols = torch.cat([part * width + rows for part in range(3)])  # of query, key and value
        c_attn, c_proj = attn.c_attn, attn.c_proj
        c_attn.weight = nn.Parameter(c_attn.weight[:, cols].clone())
        c_attn.bias = nn.Parameter(c_attn.bias[cols].clone())
        c_proj.weight = nn.Parameter(c_proj.weight[rows].clone())


def accumulate_gradients(model: nn.Module, batches: Iterable, num_batches: int) -> None:
    """Sum cross-entropy gradients over the first `num_batches` (x, y, ...) batches into `.grad`
    (a language model's over every real token), in eval mode so batch-norm statistics do not move:
    what Taylor importance reads."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            logits, target = model(batch[0].to(device)), batch[1].to(device)
            if logits.dim() == 3:  # a language model: (batch, length, vocabulary), one row per token
                logits, target = logits.flatten(0, 1), target.flatten()
            F.cross_entropy(logits, target).backward()  # padding targets (UNLABELED) are ignored
    model.train(was_training)


class StructuredPruner:
    """Removes whole channels, for real, with Torch-Pruning's dependency graph (DepGraph).

    `step(target)` prunes every prunable layer (each on its own, or ranked together with
    `global_pruning`) to `target` of its original channels removed; a lower target than reached
    removes nothing. The parameters are replaced by smaller ones, so the pruner is `structural`:
    whoever trains the model must rebuild its optimizer after a step (`PruningCallback` does).
    `ignore`: module paths never pruned (default: the classifier). `importance`: how channels
    are scored (`kdpipe.compress.importance`); one that `needs_gradients` reads `.grad`, which
    `accumulate_gradients` fills from `gradient_batches` training batches before each step.
    `round_to`: keep channel counts multiples of this (e.g. 8), the widths CPU kernels run fast.
    `layer_scale`: {module path: factor}, a layer's share of `target` (a plan from
    `kdpipe.compress.allocate`: 2 removes twice the share of its channels, 0.5 half), capped at 0.95.
    A BERT-style transformer (kdpipe's `transformer` models) loses whole attention heads and MLP
    width, `target` of each, and keeps its hidden width (`transformer_fixed_layers`); so does a
    GPT-2 decoder (`causal_lm`), its heads removed by `prune_gpt2_heads` after each step.
    """

    structural = True

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, importance: object | None = None,
                 ignore: Sequence[str] | None = None, global_pruning: bool = False,
                 gradient_batches: int = 4, round_to: int | None = None,
                 layer_scale: Mapping[str, float] | None = None) -> None:
        importance = Magnitude() if importance is None else importance
        was_training = model.training  # tracing the graph leaves the model in eval mode
        modules = dict(model.named_modules())
        gpt2 = any(isinstance(m, _conv1d()) for m in modules.values())
        extra = {}
        if gpt2:  # GPT-2's Conv1D layers, pruned as the transposed convolutions they compute like
            present_conv1d_as_transposed(model)
            extra = {"customized_pruners": {_conv1d()[0]: tp.pruner.function.PrunerBox[tp.ops.OPTYPE.CONV]},
                     "root_module_types": [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM,
                                           *_conv1d()]}
            if isinstance(getattr(importance, "target_types", None), (list, tuple)):
                importance.target_types = [*importance.target_types, *_conv1d()]
        heads = attention_heads(model)  # a BERT-style transformer: whole heads and MLP width only
        if heads or gpt2:
            paths = [*(ignore or []), *transformer_fixed_layers(model, heads)]
        else:
            paths = list(ignore) if ignore else output_layers(model, example_inputs)
        # an early-exit network: every head's input follows the channels of its block, and every
        # head's last layer outputs class scores, so the graph is traced through all of them
        forward_all = getattr(model, "forward_all", None)
        if forward_all is not None:
            paths += [f"exits.{i}.{len(head) - 1}" for i, head in enumerate(model.exits)]
        self.layer_scale = {str(k): float(v) for k, v in (layer_scale or {}).items()}
        for key, named in (("prune.pruner.ignore", paths), ("a layer_scale plan", self.layer_scale)):
            unknown = [p for p in named if p not in modules]
            if unknown:
                raise ConfigError(f"{key} names no layer {unknown}; valid module paths: "
                                  f"{', '.join(n for n in modules if n)}")
        self.model, self.ignored = model, paths
        # GPT-2 attentions lose heads outside Torch-Pruning (prune_gpt2_heads): {path: initial heads}
        self._gpt2_heads = {path: m.split_size // m.head_dim for path, m in _gpt2_attentions(model).items()
                            if path not in (ignore or []) and f"{path}.c_attn" not in (ignore or [])}
        self._gradients = needs_gradients(importance)
        self.gradient_batches = int(gradient_batches) if self._gradients else 0
        self._pruner = tp.pruner.MetaPruner(
            model, example_inputs[:1], importance=importance, global_pruning=global_pruning,
            pruning_ratio=0.0, iterative_steps=1, ignored_layers=[modules[p] for p in paths],
            round_to=int(round_to) if round_to else None,
            pruning_ratio_dict={modules[p]: 0.0 for p in self.layer_scale} or None,
            forward_fn=(lambda m, x: m.forward_all(x)) if forward_all is not None else None,
            num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=False, **extra)
        model.train(was_training)
        self._initial = self._widths()

    def _widths(self) -> dict[str, int]:
        """Output channels of every conv/linear layer that may be pruned (a GPT-2 attention's:
        its fused query/key/value projection, which loses whole heads)."""
        widths = {path: m.weight.shape[1 if isinstance(m, _conv1d()) else 0]
                  for path, m in self.model.named_modules() if isinstance(m, (*PRUNABLE, *_conv1d()))
                  and not any(path == p or path.startswith(p + ".") for p in self.ignored)}
        modules = dict(self.model.named_modules())
        widths.update({f"{path}.c_attn": modules[path].c_attn.weight.shape[1] for path in self._gpt2_heads})
        return widths

    def step(self, target: float) -> None:
        if self.gradient_batches and all(p.grad is None for p in self.model.parameters()):
            raise ValueError("this importance criterion reads loss gradients and the model has none: call "
                             "kdpipe.compress.structured.accumulate_gradients first (PruningCallback does), "
                             "or fine-tune for at least one epoch")
        self._pruner.per_step_pruning_ratio = [0.0, float(target)]  # Torch-Pruning's ratio of step 1
        self._pruner.per_step_head_pruning_ratio = [0.0, float(target)]  # a transformer's heads
        modules = dict(self.model.named_modules())
        for path, scale in self.layer_scale.items():  # a layer with a plan of its own
            self._pruner.pruning_ratio_dict[modules[path]] = [0.0, min(float(target) * scale, 0.95)]
        self._pruner.reset()
        self._pruner.step()
        modules = dict(self.model.named_modules())
        for path, initial in self._gpt2_heads.items():  # target of each block's heads, as for BERT
            attn = modules[path]
            removed = initial - attn.split_size // attn.head_dim
            prune_gpt2_heads(attn, int(float(target) * initial) - removed, self._gradients)
        sync_conv1d(self.model)

    def sparsity(self) -> float:
        """The fraction of the prunable layers' original output channels removed."""
        now = self._widths()
        return 1.0 - sum(now.values()) / max(sum(self._initial.values()), 1)

    def finalize(self) -> None:
        """Nothing to fold: the channels are gone."""


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
    sync_conv1d(model)
    return model


def export_plain_module(model: nn.Module, example: torch.Tensor, path) -> None:
    """Save the pruned network as a `torch.export` program: `torch.export.load(path).module()`
    runs it in any process with torch alone, without kdpipe or the original model code."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, str(path))

"""Intermediate-layer distillation between transformers of different depths and widths, through a
layer map in config (`{student layer: teacher layer}`, module paths such as `encoder.layer.1` or
`transformer.h.3`), as TinyBERT and MiniLM map a 4-layer student onto a 12-layer teacher.

- `HiddenStateMSE` (TinyBERT, Jiao et al. 2020, eq. 8): MSE between each mapped layer's hidden
  states, the student's through a linear map W_h to the teacher's width (trained with the student,
  dropped at export).
- `AttentionRelation` (MiniLMv2, Wang et al. 2021, eq. 4-6; the self-attention distributions of
  MiniLM, Wang et al. 2020, are its query-key relation): for the queries, keys and values of a
  mapped layer, split into `relation_heads` heads, the scaled dot-product relations
  softmax(A A^T / sqrt(d)) of student and teacher are matched by KL. Relations are L x L whatever the
  widths and head counts, so no adapter is needed.

Both average over every position of the batch, padding included (the terms see features, not the
inputs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import ConfigError
from kdpipe.losses.base import DistillOutputs, LossTerm, find_module, probe_shapes


def _layer_map(layer_map: Mapping[str, str] | None, term: str) -> dict[str, str]:
    if not layer_map:
        raise ConfigError(f"{term}: layer_map is empty; map student layers to teacher layers, e.g. "
                          f"layer_map={{encoder.layer.0:encoder.layer.1,encoder.layer.1:encoder.layer.3}}")
    return {str(k): str(v) for k, v in dict(layer_map).items()}


class HiddenStateMSE(LossTerm):
    """TinyBERT's hidden-state loss, summed over the pairs of `layer_map`."""

    def __init__(self, layer_map: Mapping[str, str]) -> None:
        super().__init__()
        self.pairs = _layer_map(layer_map, "HiddenStateMSE")
        self.student_layers, self.teacher_layers = tuple(self.pairs), tuple(self.pairs.values())
        self.adapters = nn.ModuleDict()

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s = probe_shapes(student, self.student_layers, example, "student (layer_map keys)")
        t = probe_shapes(teacher, self.teacher_layers, example, "teacher (layer_map values)")
        for i, (sl, tl) in enumerate(self.pairs.items()):
            if s[sl][:-1] != t[tl][:-1]:
                raise ConfigError(f"HiddenStateMSE: student {sl} gives {tuple(s[sl][1:])} and teacher {tl} "
                                  f"{tuple(t[tl][1:])}; map layers whose outputs differ in width only "
                                  f"(hidden states, e.g. encoder.layer.N)")
            self.adapters[str(i)] = (nn.Identity() if s[sl][-1] == t[tl][-1]
                                     else nn.Linear(s[sl][-1], t[tl][-1], bias=False))

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        total = out.student_logits.new_zeros(())
        for i, (sl, tl) in enumerate(self.pairs.items()):
            guided = self.adapters[str(i)](out.student_features[sl])
            total = total + F.mse_loss(guided, out.teacher_features[tl])
        return total


def qkv_paths(model: nn.Module, layer: str, role: str) -> tuple[str, ...]:
    """The query, key and value projections of a transformer block: BERT's three linears, or GPT-2's
    fused `attn.c_attn` (one path, split in three)."""
    modules = dict(model.named_modules())
    bert = tuple(f"{layer}.attention.self.{n}" for n in ("query", "key", "value"))
    if all(p in modules for p in bert):
        return bert
    if f"{layer}.attn.c_attn" in modules:
        return (f"{layer}.attn.c_attn",)
    find_module(model, layer, role)  # a bad path: the error lists the valid ones
    raise ConfigError(f"{role} layer {layer} has no self-attention projections (BERT's attention.self.query/"
                      f"key/value or GPT-2's attn.c_attn); map transformer blocks (encoder.layer.N, "
                      f"transformer.h.N)")


def _qkv(features: dict[str, torch.Tensor], paths: tuple[str, ...]) -> list[torch.Tensor]:
    if len(paths) == 3:
        return [features[p] for p in paths]
    return list(features[paths[0]].chunk(3, dim=-1))


def relation(x: torch.Tensor, heads: int) -> torch.Tensor:
    """log softmax(A A^T / sqrt(d)) of (B, L, H) states split into `heads`: (B, heads, L, L)."""
    b, length, width = x.shape
    a = x.reshape(b, length, heads, width // heads).transpose(1, 2)
    return F.log_softmax(a @ a.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)


class AttentionRelation(LossTerm):
    """MiniLMv2's self-attention relation transfer, summed over the query, key and value relations
    of each pair of `layer_map` (block paths), with `relation_heads` heads on both sides."""

    def __init__(self, layer_map: Mapping[str, str], relation_heads: int = 4) -> None:
        super().__init__()
        self.pairs = _layer_map(layer_map, "AttentionRelation")
        self.heads = int(relation_heads)
        if self.heads < 1:
            raise ConfigError(f"relation_heads={relation_heads} must be >= 1")
        # the blocks until setup() finds their projections: a teacher's features are read, so its
        # outputs are never cached
        self.student_layers, self.teacher_layers = tuple(self.pairs), tuple(self.pairs.values())
        self.paths: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        for sl, tl in self.pairs.items():
            self.paths[sl] = (qkv_paths(student, sl, "student"), qkv_paths(teacher, tl, "teacher"))
        self.student_layers = tuple(p for s, _ in self.paths.values() for p in s)
        self.teacher_layers = tuple(p for _, t in self.paths.values() for p in t)
        for role, model, paths in (("student", student, self.student_layers),
                                   ("teacher", teacher, self.teacher_layers)):
            for path, shape in probe_shapes(model, paths, example, role).items():
                width = shape[-1] // (3 if path.endswith("c_attn") else 1)
                if width % self.heads:
                    raise ConfigError(f"AttentionRelation: {role} {path} has width {width}, not a "
                                      f"multiple of relation_heads={self.heads}; divide both widths")

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        total = out.student_logits.new_zeros(())
        for s_paths, t_paths in self.paths.values():
            pairs = zip(_qkv(out.student_features, s_paths), _qkv(out.teacher_features, t_paths), strict=True)
            for xs, xt in pairs:
                log_s, log_t = relation(xs, self.heads), relation(xt, self.heads)
                total = total + F.kl_div(log_s.flatten(0, 2), log_t.flatten(0, 2), reduction="batchmean",
                                         log_target=True)
        return total

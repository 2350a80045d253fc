"""Penalties on the student's own weights, as terms of the composable loss."""

from __future__ import annotations

import torch
from torch import nn

from kdpipe.compress.prune import PRUNABLE
from kdpipe.losses.base import DistillOutputs, LossTerm


class WeightL1(LossTerm):
    """An L1 sparsity penalty: the mean |w| of the student's conv and linear weights (Han et al.
    2015 train with it before magnitude pruning: more weights near zero, so pruning them costs
    less). Its `weight` is the penalty's strength, e.g. 1e-4. Biases and batch norms are left alone."""

    needs_teacher = False

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        # the modules, not their weights: a parametrized weight (fine-tuning under QAT) is recomputed
        self._layers = [m for m in student.modules() if isinstance(m, PRUNABLE)]

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        layers = getattr(self, "_layers", None)
        if not layers:
            raise RuntimeError("WeightL1 reads the student's weights: call setup(student, ...) first")
        total = sum(m.weight.abs().sum() for m in layers)
        return total / sum(m.weight.numel() for m in layers)

"""A teacher made of several models whose softened outputs are averaged."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


class EnsembleTeacher(nn.Module):
    """Returns `T * log(mean_i softmax(z_i / T))`, so that `softmax(output / T)` is exactly the
    average of the members' softened distributions: Hinton et al. (2015, sec. 1) distil an
    ensemble by matching its arithmetic mean of soft targets, not the softmax of mean logits.
    `temperature` is set to the distillation temperature by the distill stage; at 1 the output
    is the log of the averaged probabilities (what `argmax` and the evaluate stage use).
    Members are trained independently by the teacher stage (`members` attribute)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        logp = torch.stack([torch.log_softmax(m(x) / t, dim=-1) for m in self.members])
        return t * (torch.logsumexp(logp, dim=0) - math.log(len(self.members)))


def ensemble(in_shape: Sequence[int], num_classes: int,
             members: Sequence[Mapping[str, Any]]) -> EnsembleTeacher:
    """Factory: each member is a model config (`_target_` + kwargs); `in_shape` and
    `num_classes` are filled in when a member does not give them."""
    if not members:
        raise ValueError("teacher=ensemble needs at least one member in teacher.model.members")
    built = []
    for spec in members:
        spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
        spec.setdefault("in_shape", list(in_shape))
        spec.setdefault("num_classes", num_classes)
        built.append(instantiate(spec, _convert_="all"))
    return EnsembleTeacher(built)

"""Self-distillation inside one network: shallow exits taught by the deepest one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.losses.base import as_layers, probe_shapes
from kdpipe.losses.response import soft_kl
from kdpipe.modules.classifier import ClassifierModule
from kdpipe.modules.distill import FeatureHooks
from kdpipe.training import Optim


class AuxiliaryExit(nn.Module):
    """A bottleneck (1x1 conv-BN-ReLU then global pooling for maps, linear-ReLU for vectors) that
    maps a shallow block's output to the deepest feature's width, and a classifier on it."""

    def __init__(self, in_shape: torch.Size, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        if len(in_shape) == 4:
            self.bottleneck = nn.Sequential(nn.Conv2d(in_shape[1], feature_dim, 1, bias=False),
                                            nn.BatchNorm2d(feature_dim), nn.ReLU(),
                                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(int(in_shape[1:].numel()), feature_dim),
                                            nn.ReLU())
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.bottleneck(x)
        return f, self.classifier(f)


class SelfDistillationModule(ClassifierModule):
    """"Be Your Own Teacher" (Zhang, Song, Gao, Chen, Bao & Ma 2019, ICCV, sec. 3.2):
    `sum_i (1 - alpha) CE(y, q_i) + alpha * T^2 KL(q_C^T || q_i^T) + lambda ||F_i - F_C||^2`
    over the shallow exits i, plus CE on the deepest classifier C.

    Why: the deepest classifier teaches exits placed on shallow blocks (auxiliary bottleneck +
    classifier); the gradients of those exits reach the shallow blocks directly and regularise
    them, so the network itself improves without any separate teacher. The exits live here,
    not in the student, so they are dropped at export. The paper tunes alpha and lambda per
    dataset; the defaults (alpha=0.3, lambda=0.03, T=3) are a starting point.

    Terms: `ce` (deepest + shallow exits), `kd`, `feature`.
    """

    def __init__(self, model: nn.Module, num_classes: int, example_input: torch.Tensor,
                 exit_layers: Sequence[str], feature_layer: str = "pool", alpha: float = 0.3,
                 feature_weight: float = 0.03, temperature: float = 3.0, optim: Optim | None = None,
                 augment: nn.Module | None = None) -> None:
        super().__init__(model, num_classes, optim, augment)
        self.exit_layers, self.feature_layer = as_layers(exit_layers), feature_layer
        shapes = probe_shapes(model, (*self.exit_layers, feature_layer), example_input,
                              "student (distill.scheme.exit_layers)")
        feature_dim = int(shapes[feature_layer][1:].numel())
        self.exits = nn.ModuleList(AuxiliaryExit(shapes[p], feature_dim, num_classes)
                                   for p in self.exit_layers)
        self.hooks = FeatureHooks(model, (*self.exit_layers, feature_layer), "student")
        self.alpha, self.feature_weight, self.temperature = (float(alpha), float(feature_weight),
                                                             float(temperature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self.hooks.pop()
        return logits

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        deep = self.model(x)
        feats = self.hooks.pop()
        deep_feature = feats[self.feature_layer].flatten(1).detach()
        ce, kd, hint = F.cross_entropy(deep, y), deep.new_zeros(()), deep.new_zeros(())
        for path, head in zip(self.exit_layers, self.exits, strict=True):
            f, logits = head(feats[path])
            ce = ce + (1 - self.alpha) * F.cross_entropy(logits, y)
            kd = kd + self.alpha * soft_kl(logits, deep.detach(), self.temperature)
            hint = hint + self.feature_weight * (f - deep_feature).pow(2).sum(1).mean()
        return {"ce": ce, "kd": kd, "feature": hint}

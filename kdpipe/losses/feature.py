"""Feature-based distillation: match what intermediate layers compute, not only the logits.

Layers are named by module path (`features.1`, `layer3`) and captured with forward hooks, so
any `nn.Module` works as teacher or student; adapters are sized by probing the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import ConfigError
from kdpipe.losses.base import DistillOutputs, LossTerm, layer_pairs, probe_shapes


def match_spatial(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Average-pool (or, when it is smaller, bilinearly upsample) a feature map to `size`."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class FeatureAdapter(nn.Module):
    """Maps a student feature to the teacher's shape: a 1x1 convolution for maps (B, C, H, W)
    followed by resizing to the teacher's H x W, a linear layer for vectors (B, D). FitNets'
    regressor (Romero et al. 2015, sec. 2.2): it is trained with the student and dropped at
    export, so the student itself keeps its size."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 4):
            raise ConfigError(
                f"cannot map a student feature of shape {tuple(student_shape[1:])} to a teacher feature of "
                f"shape {tuple(teacher_shape[1:])}: pick two convolutional layers (C, H, W) or two vector "
                f"layers (D) for the term's student_layer / teacher_layer")
        self.size = tuple(teacher_shape[2:])
        if len(student_shape) == 4:
            self.proj = nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1, bias=False)
        else:
            self.proj = nn.Linear(student_shape[1], teacher_shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return match_spatial(y, self.size) if self.size else y


class Hint(LossTerm):
    """FitNets hint (Romero, Ballas, Kahou, Chassang, Gatta & Bengio 2015, eq. 3):
    `1/2 * || u_h(x) - r(v_g(x)) ||^2` between the teacher's hint layer `u_h` and the regressed
    guided layer `r(v_g)` of the student, averaged per element.

    Why: a thin, deep student is hard to train from logits alone; a hint on a middle layer guides
    its intermediate representation. The paper trains the hint first, then KD; here the terms run
    together (add `kd` beside it), which is how most later work uses it. The regressor `r` is
    sized by probing both models, trained with the student, and dropped at export."""

    def __init__(self, student_layer: str, teacher_layer: str) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.adapter: FeatureAdapter | None = None

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s = probe_shapes(student, self.student_layers, example, "student (hint student_layer)")
        t = probe_shapes(teacher, self.teacher_layers, example, "teacher (hint teacher_layer)")
        self.adapter = FeatureAdapter(s[self.student_layers[0]], t[self.teacher_layers[0]])

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        guided = self.adapter(out.student_features[self.student_layers[0]])
        return 0.5 * F.mse_loss(guided, out.teacher_features[self.teacher_layers[0]])


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017), eq. 2 and sec. 3.1: the channel mean of |A|^p, flattened
    and L2-normalised per sample, so maps of layers with different widths are comparable."""
    return F.normalize(x.abs().pow(p).mean(dim=1).flatten(1), dim=1)


class AttentionTransfer(LossTerm):
    """Activation-based attention transfer (Zagoruyko & Komodakis 2017, ICLR, eq. 2):
    `sum_j || Q_s^j/||Q_s^j|| - Q_t^j/||Q_t^j|| ||_p` over layer pairs j, implemented as in the
    authors' code (the mean of squared differences of normalised maps); the paper's beta/2 = 500
    is the term's weight in config.

    Why: where a network looks is a compact, width-independent summary of a layer, so a much
    thinner student can still copy it at several depths. When a pair's maps differ in resolution
    the larger one is average-pooled to the smaller."""

    def __init__(self, student_layers: Sequence[str], teacher_layers: Sequence[str], p: float = 2.0) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = layer_pairs(student_layers, teacher_layers,
                                                               "attention transfer")
        self.p = float(p)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s = probe_shapes(student, self.student_layers, example, "student (attention student_layers)")
        t = probe_shapes(teacher, self.teacher_layers, example, "teacher (attention teacher_layers)")
        for sl, tl in zip(self.student_layers, self.teacher_layers, strict=True):
            if len(s[sl]) != 4 or len(t[tl]) != 4:
                raise ConfigError(f"attention transfer needs convolutional feature maps (B, C, H, W); "
                                  f"student {sl} gives {tuple(s[sl])}, teacher {tl} gives {tuple(t[tl])}")

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        total = out.student_logits.new_zeros(())
        for sl, tl in zip(self.student_layers, self.teacher_layers, strict=True):
            fs, ft = out.student_features[sl], out.teacher_features[tl]
            size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
            qs, qt = (attention_map(match_spatial(fs, size), self.p),
                      attention_map(match_spatial(ft, size), self.p))
            total = total + (qs - qt).pow(2).mean()
        return total

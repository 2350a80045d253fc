"""Relation-based distillation: match how samples relate to each other in a batch, which needs
no adapter because the relations have the same shape whatever the widths of the two models."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.errors import ConfigError
from kdpipe.losses.base import DistillLoss, DistillOutputs, layer_pairs
from kdpipe.losses.response import check_temperature_alpha, response_terms


def _pick(features: dict[str, torch.Tensor], layer: str | None, logits: torch.Tensor) -> torch.Tensor:
    return (features[layer] if layer else logits).flatten(1)


def rkd_distance(e: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances divided by their mean over distinct pairs (Park et al.
    2019, eq. 3-4): the normalisation makes teacher and student distances comparable."""
    d = torch.cdist(e, e).clamp_min(0)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d / d[off].mean().clamp_min(1e-12)


def rkd_angle(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between e_i - e_j and e_k - e_j for every triplet (Park et al.
    2019, eq. 5), as a (B, B, B) tensor indexed [j, i, k]."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [j, i] = e_i - e_j, unit length
    return torch.bmm(diff, diff.transpose(1, 2))


class RelationalKD(DistillLoss):
    """Relational knowledge distillation (Park, Kim, Lu & Cho 2019, CVPR, eq. 3-6):
    `lambda_D * Huber(psi_D(t), psi_D(s)) + lambda_A * Huber(psi_A(t), psi_A(s))`, the distance
    potential over pairs and the angle potential over triplets of the batch's embeddings.

    Why: it transfers the structure of the teacher's embedding space (which samples are close,
    which directions they lie in) rather than individual outputs, so a student of another width
    or even another output dimension can learn it. Defaults are the paper's: lambda_D=25,
    lambda_A=50, on the penultimate embedding (`layer: null` uses the logits).

    Terms: `distance`, `angle`, `kd` (when alpha > 0), `ce`.
    """

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None,
                 distance_weight: float = 25.0, angle_weight: float = 50.0,
                 temperature: float = 4.0, alpha: float = 0.0) -> None:
        super().__init__()
        check_temperature_alpha(temperature, alpha)
        if (student_layer is None) != (teacher_layer is None):
            raise ConfigError("give both distill.student_layer and distill.teacher_layer, or neither (logits)")
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_layers = (student_layer,) if student_layer else ()
        self.teacher_layers = (teacher_layer,) if teacher_layer else ()
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, out: DistillOutputs) -> dict[str, torch.Tensor]:
        s = _pick(out.student_features, self.student_layer, out.student_logits)
        with torch.no_grad():
            t = _pick(out.teacher_features, self.teacher_layer, out.teacher_logits)
            t_dist, t_angle = rkd_distance(t), rkd_angle(t)
        terms = {
            "distance": self.distance_weight * F.smooth_l1_loss(rkd_distance(s), t_dist),
            "angle": self.angle_weight * F.smooth_l1_loss(rkd_angle(s), t_angle),
        }
        terms.update(response_terms(out, 1.0 - self.alpha, self.alpha, self.temperature))
        return terms


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """G = A A^T of the flattened activations, each row L2-normalised (Tung & Mori 2019, eq. 2)."""
    a = f.flatten(1)
    return F.normalize(a @ a.t(), dim=1)


class SimilarityPreserving(DistillLoss):
    """Similarity-preserving KD (Tung & Mori 2019, ICCV, eq. 3-4):
    `gamma / b^2 * sum_pairs || G_t - G_s ||_F^2` over layer pairs, with b the batch size.

    Why: inputs that the teacher maps to similar activations should also be similar for the
    student; the b x b similarity matrices need no adapter between layers of different widths.
    Default gamma=3000 is the paper's CIFAR-10 value.

    Terms: `sp`, `kd` (when alpha > 0), `ce`.
    """

    def __init__(self, student_layers, teacher_layers, gamma: float = 3000.0,
                 temperature: float = 4.0, alpha: float = 0.0) -> None:
        super().__init__()
        check_temperature_alpha(temperature, alpha)
        self.student_layers, self.teacher_layers = layer_pairs(student_layers, teacher_layers, "similarity preservation")
        self.gamma, self.temperature, self.alpha = float(gamma), float(temperature), float(alpha)

    def forward(self, out: DistillOutputs) -> dict[str, torch.Tensor]:
        total = out.student_logits.new_zeros(())
        b = out.student_logits.shape[0]
        for sl, tl in zip(self.student_layers, self.teacher_layers, strict=True):
            g_s = similarity_matrix(out.student_features[sl])
            g_t = similarity_matrix(out.teacher_features[tl].detach())
            total = total + (g_t - g_s).pow(2).sum() / b**2
        terms = {"sp": self.gamma * total}
        terms.update(response_terms(out, 1.0 - self.alpha, self.alpha, self.temperature))
        return terms

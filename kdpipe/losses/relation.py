"""Relation-based distillation: match how samples relate to each other in a batch, which needs
no adapter because the relations have the same shape whatever the widths of the two models."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.errors import ConfigError
from kdpipe.losses.base import DistillOutputs, LossTerm, layer_pairs


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


class _Embedding(LossTerm):
    """A term on one layer's embedding of the batch (`null` layers: the logits)."""

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None) -> None:
        super().__init__()
        if (student_layer is None) != (teacher_layer is None):
            raise ConfigError("give both student_layer and teacher_layer, or neither (the logits)")
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_layers = (student_layer,) if student_layer else ()
        self.teacher_layers = (teacher_layer,) if teacher_layer else ()

    def embeddings(self, out: DistillOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        s = _pick(out.student_features, self.student_layer, out.student_logits)
        return s, _pick(out.teacher_features, self.teacher_layer, out.teacher_logits).detach()


class RKDDistance(_Embedding):
    """Relational KD's distance potential (Park, Kim, Lu & Cho 2019, CVPR, eq. 3-4): the Huber
    loss between the teacher's and the student's normalised pairwise distances of the batch's
    embeddings. Why: it transfers the structure of the embedding space, not single outputs, so a
    student of another width can learn it without an adapter. The paper's weight: 25."""

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        s, t = self.embeddings(out)
        return F.smooth_l1_loss(rkd_distance(s), rkd_distance(t))


class RKDAngle(_Embedding):
    """Relational KD's angle potential (Park et al. 2019, eq. 5-6): the Huber loss between the
    cosines of the angles formed by every triplet of the batch's embeddings. The paper's weight: 50."""

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        s, t = self.embeddings(out)
        return F.smooth_l1_loss(rkd_angle(s), rkd_angle(t))


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """G = A A^T of the flattened activations, each row L2-normalised (Tung & Mori 2019, eq. 2)."""
    a = f.flatten(1)
    return F.normalize(a @ a.t(), dim=1)


class SimilarityPreserving(LossTerm):
    """Similarity-preserving KD (Tung & Mori 2019, ICCV, eq. 3-4):
    `1 / b^2 * sum_pairs || G_t - G_s ||_F^2` over layer pairs, with b the batch size; the paper's
    gamma (3000 on CIFAR-10) is the term's weight in config.

    Why: inputs that the teacher maps to similar activations should also be similar for the
    student; the b x b similarity matrices need no adapter between layers of different widths."""

    def __init__(self, student_layers, teacher_layers) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = layer_pairs(student_layers, teacher_layers,
                                                               "similarity preservation")

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        total = out.student_logits.new_zeros(())
        b = out.student_logits.shape[0]
        for sl, tl in zip(self.student_layers, self.teacher_layers, strict=True):
            g_s = similarity_matrix(out.student_features[sl])
            g_t = similarity_matrix(out.teacher_features[tl].detach())
            total = total + (g_t - g_s).pow(2).sum() / b**2
        return total

"""Response-based terms: the hard labels, and the teacher's output distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe import limits
from kdpipe.losses.base import DistillOutputs, LossTerm, hard_labels, label_cross_entropy
from kdpipe.losses.token import TopK, log_probs


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (`batchmean`).

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", sec. 2:
    the gradients of the softened term scale as 1/T^2, so multiplying by T^2 keeps its
    contribution comparable to the hard-label term when T changes.
    """
    if isinstance(teacher_logits, TopK):  # a language model teacher's cached top-k (kdpipe.losses.token)
        log_p_s, log_p_t = log_probs(student_logits, teacher_logits, temperature)
    else:
        log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class CrossEntropy(LossTerm):
    """Cross-entropy of the student's logits with the labels (the labeled images of the batch;
    mixed labels under mixup/cutmix)."""

    needs_teacher = False

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        return label_cross_entropy(out.student_logits, out.target)


class SoftTargetKL(LossTerm):
    """Hinton et al. (2015): `T^2 * KL(p_t^T || p_s^T)`, the softened teacher distribution as a
    target. With CE at weight `1 - alpha` and this term at `alpha`, it is classic KD."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = limits.temperature(temperature)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        return soft_kl(out.student_logits, out.teacher_logits, self.temperature)


class TargetClassKD(LossTerm):
    """TCKD of decoupled KD (Zhao, Cui, Song, Qiu & Liang 2022, CVPR, eq. 7): the binary KL between
    the (target, all other classes) probabilities of teacher and student at temperature T, times T^2.

    Why: classic KD equals `TCKD + (1 - p_t^T) * NCKD` (their eq. 4); decoupling lets each part
    have its own weight (`alpha` on TCKD, `beta` on NCKD in the paper: 1 and 8 on CIFAR-100)."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = limits.temperature(temperature)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        T = self.temperature
        rows, target = hard_labels(out.target)  # defined on labeled images only
        if not bool(rows.any()):
            return out.student_logits.sum() * 0.0
        s, t = out.student_logits[rows], out.teacher_logits[rows]
        mask = F.one_hot(target, s.shape[-1]).bool()
        p_s, p_t = F.softmax(s / T, dim=-1), F.softmax(t / T, dim=-1)
        b_s = torch.stack([p_s[mask], (p_s * ~mask).sum(-1)], dim=-1).clamp_min(1e-12)
        b_t = torch.stack([p_t[mask], (p_t * ~mask).sum(-1)], dim=-1).clamp_min(1e-12)
        return F.kl_div(b_s.log(), b_t, reduction="batchmean") * T**2


class NonTargetClassKD(LossTerm):
    """NCKD of decoupled KD (Zhao et al. 2022, eq. 7): the KL between the teacher's and the
    student's softmax over the non-target classes only, at temperature T, times T^2. It carries
    the "dark knowledge" that classic KD suppresses when the teacher is confident."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = limits.temperature(temperature)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        rows, target = hard_labels(out.target)  # defined on labeled images only
        if not bool(rows.any()):
            return out.student_logits.sum() * 0.0
        s, t = out.student_logits[rows], out.teacher_logits[rows]
        mask = F.one_hot(target, s.shape[-1]).bool()
        # The target logit pushed 1000 down (as in the authors' code): the softmax over the
        # remaining classes, renormalised, without the NaN an -inf would give.
        return soft_kl(s - 1000.0 * mask, t - 1000.0 * mask, self.temperature)


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Each sample's logits as z-scores: minus their mean, over their (unbiased) std."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (logits.std(dim=-1, keepdim=True) + eps)


class LogitStandardizedKL(LossTerm):
    """Logit-standardised KD (Sun, Ren, Li, Wang & Cao 2024, CVPR, "Logit Standardization in
    Knowledge Distillation"): `T^2 * KL(softmax(z(t)/T) || softmax(z(s)/T))` with `z` the per-sample
    z-score of the logits. The student then matches the teacher's logit relations, not their
    range and scale, which a smaller student may not be able to reach."""

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = limits.temperature(temperature)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        return soft_kl(standardize(out.student_logits), standardize(out.teacher_logits), self.temperature)


def mean_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The mean over rows of the Pearson correlation between the rows of `a` and of `b`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


class InterClassRelation(LossTerm):
    """DIST's inter-class term (Huang, You, Wang, Qian & Xu 2022, NeurIPS, "Knowledge Distillation
    from A Stronger Teacher"): `T^2 * (1 - mean Pearson correlation)` between the student's and the
    teacher's class distributions of each sample, at temperature T. A correlation, not a KL: the
    student keeps the teacher's ranking of the classes without matching its exact probabilities,
    which helps when the teacher is much stronger. Weight `beta` of the paper."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = limits.temperature(temperature)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        T = self.temperature
        p_s, p_t = F.softmax(out.student_logits / T, dim=-1), F.softmax(out.teacher_logits / T, dim=-1)
        return T**2 * (1.0 - mean_pearson(p_s, p_t))


class IntraClassRelation(InterClassRelation):
    """DIST's intra-class term (Huang et al. 2022): the same correlation taken per class, across the
    samples of the batch: how the teacher ranks the samples by their probability of each class.
    Weight `gamma` of the paper."""

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        T = self.temperature
        p_s, p_t = F.softmax(out.student_logits / T, dim=-1), F.softmax(out.teacher_logits / T, dim=-1)
        return T**2 * (1.0 - mean_pearson(p_s.T, p_t.T))

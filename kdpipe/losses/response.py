"""Response-based distillation: match the teacher's output distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdpipe.errors import ConfigError
from kdpipe.losses.base import DistillLoss, DistillOutputs


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (`batchmean`).

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", sec. 2:
    the gradients of the softened term scale as 1/T^2, so multiplying by T^2 keeps its
    contribution comparable to the hard-label term when T changes.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class HintonKD(DistillLoss):
    """Classic knowledge distillation (Hinton et al. 2015):
    `loss = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y, p_s)`.

    Terms: `kd` (softened KL, weighted by alpha) and `ce` (hard labels, weighted 1 - alpha).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        check_temperature_alpha(temperature, alpha)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(self, out: DistillOutputs) -> dict[str, torch.Tensor]:
        kd = soft_kl(out.student_logits, out.teacher_logits, self.temperature)
        ce = F.cross_entropy(out.student_logits, out.target)
        return {"kd": self.alpha * kd, "ce": (1.0 - self.alpha) * ce}


def check_temperature_alpha(temperature: float, alpha: float, what: str = "the KD term against CE") -> None:
    if temperature <= 0:
        raise ConfigError(f"distill.temperature={temperature} must be > 0 (try 1-16; 4 is a common default)")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill.alpha={alpha} must lie in [0, 1] (the weight of {what})")


def response_terms(out: DistillOutputs, ce_weight: float, kd_weight: float, temperature: float) -> dict[str, torch.Tensor]:
    """The hard-label term and, when `kd_weight > 0`, Hinton's softened term: the logit part
    that feature- and relation-based schemes add to their own terms."""
    terms = {"ce": ce_weight * F.cross_entropy(out.student_logits, out.target)}
    if kd_weight > 0:
        terms["kd"] = kd_weight * soft_kl(out.student_logits, out.teacher_logits, temperature)
    return terms


class DecoupledKD(DistillLoss):
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang 2022, CVPR, eq. 7):
    `loss = CE + alpha * TCKD + beta * NCKD`.

    Why: classic KD equals `TCKD + (1 - p_t^T) * NCKD` (their eq. 4), so the non-target part
    that carries the "dark knowledge" is suppressed exactly when the teacher is confident,
    which it is on its own training set. Decoupling gives NCKD its own weight. TCKD is the
    binary KL between (target, rest) probabilities; NCKD the KL between the softmaxes over
    the non-target classes only; both at temperature T with the T^2 factor and `batchmean`.
    Defaults are the paper's CIFAR-100 values: alpha=1, beta=8, T=4.

    Terms: `ce`, `tckd`, `nckd`.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"distill.temperature={temperature} must be > 0 (try 1-16; 4 is a common default)")
        for name, v in (("alpha", alpha), ("beta", beta), ("ce_weight", ce_weight)):
            if v < 0:
                raise ConfigError(f"distill.{name}={v} must be >= 0 (a loss weight)")
        self.temperature, self.alpha, self.beta, self.ce_weight = float(temperature), float(alpha), float(beta), float(ce_weight)

    def forward(self, out: DistillOutputs) -> dict[str, torch.Tensor]:
        s, t, y, T = out.student_logits, out.teacher_logits, out.target, self.temperature
        mask = F.one_hot(y, s.shape[-1]).bool()
        p_s, p_t = F.softmax(s / T, dim=-1), F.softmax(t / T, dim=-1)
        b_s = torch.stack([p_s[mask], (p_s * ~mask).sum(-1)], dim=-1).clamp_min(1e-12)
        b_t = torch.stack([p_t[mask], (p_t * ~mask).sum(-1)], dim=-1).clamp_min(1e-12)
        tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean") * T**2
        # The target logit pushed 1000 down (as in the authors' code): the softmax over the
        # remaining classes, renormalised, without the NaN an -inf would give.
        nckd = soft_kl(s - 1000.0 * mask, t - 1000.0 * mask, T)
        return {"ce": self.ce_weight * F.cross_entropy(s, y), "tckd": self.alpha * tckd, "nckd": self.beta * nckd}

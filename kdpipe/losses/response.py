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
        if temperature <= 0:
            raise ConfigError(f"distill.temperature={temperature} must be > 0 (try 1-16; 4 is a common default)")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill.alpha={alpha} must lie in [0, 1] (the weight of the KD term against CE)")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(self, out: DistillOutputs) -> dict[str, torch.Tensor]:
        kd = soft_kl(out.student_logits, out.teacher_logits, self.temperature)
        ce = F.cross_entropy(out.student_logits, out.target)
        return {"kd": self.alpha * kd, "ce": (1.0 - self.alpha) * ce}

"""Token-level distillation terms for language models, and the top-k form of a teacher's outputs.

A causal LM's logits are `(batch, length, vocabulary)` with targets `(batch, length)` where padding
(and any position without a next token) is `UNLABELED` (-100). `token_rows` keeps the positions
that have a target as rows, so every term (these and the classification ones) averages over real
tokens only: padding is masked by construction.

The divergences users compare for LMs (each per token, averaged over tokens, at temperature T on
both sides, without the T^2 factor of Hinton's KD, as in GKD's and DistiLLM's code):

- `ForwardKL`  KL(p_T || p_S): mean-seeking, the classic token-level KD (Hinton 2015; Kim & Rush 2016);
- `ReverseKL`  KL(p_S || p_T): mode-seeking (MiniLLM, Gu et al. 2024);
- `GeneralizedJSD`  beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S
  (GKD, Agarwal et al. 2024; 0 < beta < 1, 0.5 is the symmetric JSD);
- `SkewKL`  KL(p_T || a p_T + (1 - a) p_S), or reversed KL(p_S || a p_S + (1 - a) p_T)
  (DistiLLM, Ko et al. 2024; a = 0.1), bounded where the plain KL explodes.

Top-k teacher outputs (`TopK`, what the teacher-output cache stores for LMs: a vocabulary of
thousands times every token does not fit on disk): the k largest logits per token and their
token ids. With a top-k teacher the terms compare the two distributions **renormalised over the
teacher's k tokens**: the teacher's tail is dropped and its top-k probabilities rescaled to sum to
1, and the student's probabilities at those k tokens are rescaled the same way. At k = vocabulary
size this is exact; the student's mass outside the k tokens is left to the cross-entropy term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdpipe.data.base import UNLABELED
from kdpipe.errors import ConfigError
from kdpipe.losses.base import DistillOutputs, LossTerm


@dataclass
class TopK:
    """The k largest teacher logits per token (`values`) and their token ids (`indices`)."""

    values: torch.Tensor
    indices: torch.Tensor

    def __getitem__(self, index) -> TopK:
        return TopK(self.values[index], self.indices[index])

    def __len__(self) -> int:
        return len(self.values)

    def to(self, device) -> TopK:
        return TopK(self.values.to(device), self.indices.to(device))


def topk_logits(logits: torch.Tensor, k: int) -> TopK:
    """The top-k form of `logits` (any leading shape, vocabulary last), values stored as float16
    and ids as int32 when they fit: 6 bytes a kept entry instead of 4 per vocabulary entry."""
    k = min(int(k), logits.shape[-1])
    values, indices = logits.topk(k, dim=-1)
    ids = indices.to(torch.int32) if logits.shape[-1] < 2**31 else indices
    return TopK(values.to(torch.float16), ids)


def token_rows(logits: torch.Tensor, target: torch.Tensor, *others):
    """Sequence outputs `(B, L, V)` with targets `(B, L)` as rows `(N, V)` of the positions that
    have a target (padding and hidden labels dropped), with `others` (teacher logits, TopK) cut the
    same way. Classifier outputs `(B, C)` pass through unchanged."""
    if logits.dim() != 3:
        return (logits, target, *others)
    keep = target.reshape(-1) != UNLABELED
    rows = [logits.reshape(-1, logits.shape[-1])[keep], target.reshape(-1)[keep]]
    for o in others:
        if o is None:
            rows.append(None)
        elif isinstance(o, TopK):
            rows.append(TopK(o.values.reshape(-1, o.values.shape[-1])[keep],
                             o.indices.reshape(-1, o.indices.shape[-1])[keep]))
        else:
            rows.append(o.reshape(-1, o.shape[-1])[keep])
    return tuple(rows)


def log_probs(student_logits: torch.Tensor, teacher, temperature: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities over the same support: the vocabulary, or the
    teacher's top k tokens with both renormalised over them (module docstring)."""
    T = float(temperature)
    if isinstance(teacher, TopK):
        s = student_logits.gather(-1, teacher.indices.long())
        return F.log_softmax(s / T, dim=-1), F.log_softmax(teacher.values.to(s.dtype) / T, dim=-1)
    return F.log_softmax(student_logits / T, dim=-1), F.log_softmax(teacher / T, dim=-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities (0 log 0 = 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 - w) q), computed in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _mean(per_row: torch.Tensor) -> torch.Tensor:
    return per_row.mean() if per_row.numel() else per_row.sum()


def forward_kl(s, t, temperature=1.0):
    log_s, log_t = log_probs(s, t, temperature)
    return _mean(kl(log_t, log_s))


def reverse_kl(s, t, temperature=1.0):
    log_s, log_t = log_probs(s, t, temperature)
    return _mean(kl(log_s, log_t))


def generalized_jsd(s, t, beta=0.5, temperature=1.0):
    log_s, log_t = log_probs(s, t, temperature)
    m = mixture(log_t, log_s, beta)
    return _mean(beta * kl(log_t, m) + (1 - beta) * kl(log_s, m))


def skew_kl(s, t, alpha=0.1, reverse=False, temperature=1.0):
    log_s, log_t = log_probs(s, t, temperature)
    if reverse:
        return _mean(kl(log_s, mixture(log_s, log_t, alpha)))
    return _mean(kl(log_t, mixture(log_t, log_s, alpha)))


def _temperature(value) -> float:
    value = float(value)
    if not value > 0:
        raise ConfigError(f"temperature={value} must be > 0")
    return value


class _TokenTerm(LossTerm):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _temperature(temperature)

    def rows(self, out: DistillOutputs):
        s, _, t = token_rows(out.student_logits, out.target, out.teacher_logits)
        return s, t


class ForwardKL(_TokenTerm):
    """KL(p_teacher || p_student) per token (mean-seeking)."""

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        return forward_kl(*self.rows(out), self.temperature)


class ReverseKL(_TokenTerm):
    """KL(p_student || p_teacher) per token (mode-seeking, MiniLLM)."""

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        return reverse_kl(*self.rows(out), self.temperature)


class GeneralizedJSD(_TokenTerm):
    """GKD's generalised Jensen-Shannon divergence at `beta` (0 < beta < 1)."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        if not 0.0 < float(beta) < 1.0:
            raise ConfigError(f"beta={beta} must be strictly between 0 and 1; at 0 and 1 the JSD "
                              f"vanishes: use kdpipe.losses.ForwardKL or ReverseKL")
        self.beta = float(beta)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        return generalized_jsd(*self.rows(out), self.beta, self.temperature)


class SkewKL(_TokenTerm):
    """DistiLLM's skew KL at `alpha` (0 <= alpha < 1; 0 is the plain KL); `reverse` for the skew
    reverse KL."""

    def __init__(self, alpha: float = 0.1, reverse: bool = False, temperature: float = 1.0) -> None:
        super().__init__(temperature)
        if not 0.0 <= float(alpha) < 1.0:
            raise ConfigError(f"alpha={alpha} must be in [0, 1): the share of the target distribution "
                              f"mixed into the other one")
        self.alpha, self.reverse = float(alpha), bool(reverse)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        return skew_kl(*self.rows(out), self.alpha, self.reverse, self.temperature)

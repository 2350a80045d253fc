"""Contrastive representation distillation: the student's embedding of an image must pick out the
teacher's embedding of the same image among the embeddings of many other images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe import limits
from kdpipe.losses.base import DistillOutputs, LossTerm, probe_shapes


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """`-log( e^{a.p/tau} / (e^{a.p/tau} + sum_k e^{a.n_k/tau}) )`, averaged over the rows of
    `anchor` (B, D); `positive` (B, D) is each row's match and `negatives` (K, D) are shared."""
    pos = (anchor * positive).sum(dim=1, keepdim=True)
    logits = torch.cat([pos, anchor @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))


class ContrastiveRepresentation(LossTerm):
    """CRD (Tian, Krishnan & Isola 2020, ICLR, "Contrastive Representation Distillation"). A linear
    embedding of the student's `student_layer` and of the teacher's `teacher_layer` (both
    L2-normalised to `feat_dim`, 128 as in the paper) are trained so that the pair of one image
    scores high and pairs of different images low. Both directions count, as in the paper: the
    student's embedding against the teacher's embeddings of other images, and the teacher's
    against the student's. The negatives come from a memory bank of the last `num_negatives`
    embeddings of each side (filled batch by batch, a queue), so each step contrasts with
    thousands of images while computing only its batch; `nce_temperature` 0.07 as in the paper.

    The paper scores pairs with its NCE estimator (a constant for the partition function); this is
    the softmax (InfoNCE) form of the same objective, which its authors' code also offers and
    later work uses. The embeddings are trained with the student and dropped at export."""

    def __init__(self, student_layer: str = "pool", teacher_layer: str = "pool", feat_dim: int = 128,
                 num_negatives: int = 4096, nce_temperature: float = 0.07) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.feat_dim = limits.positive_int(feat_dim, "crd feat_dim", "the embedding size, e.g. 128")
        self.num_negatives = limits.positive_int(num_negatives, "crd num_negatives",
                                                 "embeddings in each memory bank, e.g. 4096")
        self.nce_temperature = limits.temperature(nce_temperature, "crd nce_temperature")
        self.embed_s: nn.Module | None = None
        self.embed_t: nn.Module | None = None

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s = probe_shapes(student, self.student_layers, example, "student (crd student_layer)")
        t = probe_shapes(teacher, self.teacher_layers, example, "teacher (crd teacher_layer)")
        self.embed_s = nn.Linear(math.prod(s[self.student_layers[0]][1:]), self.feat_dim)
        self.embed_t = nn.Linear(math.prod(t[self.teacher_layers[0]][1:]), self.feat_dim)
        gen = torch.Generator().manual_seed(0)  # random unit vectors until real embeddings replace them
        for name in ("bank_s", "bank_t"):
            self.register_buffer(name, F.normalize(torch.randn(self.num_negatives, self.feat_dim,
                                                               generator=gen), dim=1))
        self.register_buffer("bank_next", torch.zeros((), dtype=torch.long))

    def embed(self, out: DistillOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        v_s = self.embed_s(out.student_features[self.student_layers[0]].flatten(1))
        v_t = self.embed_t(out.teacher_features[self.teacher_layers[0]].flatten(1))
        return F.normalize(v_s, dim=1), F.normalize(v_t, dim=1)

    def forward(self, out: DistillOutputs) -> torch.Tensor:
        v_s, v_t = self.embed(out)
        tau = self.nce_temperature
        # copies: autograd keeps the banks for the backward pass, and `remember` overwrites them
        loss = info_nce(v_s, v_t, self.bank_t.clone(), tau) + info_nce(v_t, v_s, self.bank_s.clone(), tau)
        if self.training:
            self.remember(v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def remember(self, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Write this batch's embeddings over the oldest ones of each bank."""
        n = min(len(v_s), self.num_negatives)
        rows = (self.bank_next + torch.arange(n, device=v_s.device)) % self.num_negatives
        self.bank_s[rows], self.bank_t[rows] = v_s[-n:], v_t[-n:]
        self.bank_next.copy_((self.bank_next + n) % self.num_negatives)

"""Online distillation: peers trained together, each taught by the others."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.losses.response import soft_kl
from kdpipe.modules.classifier import ClassifierModule
from kdpipe.training import Optim


class MutualLearningModule(ClassifierModule):
    """Deep mutual learning (Zhang, Xiang, Hospedales & Lu 2018, CVPR, eq. 10):
    peer k minimises `CE(y, p_k) + 1/(K-1) * sum_{l != k} KL(p_l || p_k)`.

    Why: no pretrained teacher is needed; a cohort of students trained from scratch learns
    better than each alone because the peers' posteriors act as soft targets that keep every
    peer away from over-confident minima. The paper updates peers in turn; here all peers take
    one joint step on the sum of their losses, with the other peers' outputs detached, which
    gives every peer the gradient of its own loss. `temperature` (T^2-scaled) defaults to the
    paper's 1. Peer 0 (`self.model`) is the student that is validated and exported.

    Terms: `ce` (summed over peers), `mimic` (the KL terms, summed over peers).
    """

    def __init__(self, peers: Sequence[nn.Module], num_classes: int, temperature: float = 1.0,
                 optim: Optim | None = None, augment: nn.Module | None = None) -> None:
        if len(peers) < 2:
            raise ValueError("deep mutual learning needs at least 2 peers (distill.scheme.peers)")
        super().__init__(peers[0], num_classes, optim, augment)
        self.others = nn.ModuleList(peers[1:])
        self.temperature = float(temperature)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = [self.model(x)] + [peer(x) for peer in self.others]
        k = len(logits)
        ce = sum(F.cross_entropy(z, y) for z in logits)
        mimic = sum(soft_kl(zi, zl.detach(), self.temperature) / (k - 1)
                    for i, zi in enumerate(logits) for l_, zl in enumerate(logits) if l_ != i)
        return {"ce": ce, "mimic": mimic}

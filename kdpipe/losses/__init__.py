"""Distillation losses, one file per family (Gou et al. 2021's taxonomy):
`response` (logits), `feature` (intermediate layers), `relation` (sample-to-sample structure).

Every loss is an `nn.Module` whose `forward(out: DistillOutputs)` returns a dict of named,
already weighted terms; the training module sums them and logs each as `train/loss_<name>`.
"""

from kdpipe.losses.base import DistillLoss, DistillOutputs
from kdpipe.losses.feature import AttentionTransfer, FitNet
from kdpipe.losses.relation import RelationalKD, SimilarityPreserving
from kdpipe.losses.response import DecoupledKD, HintonKD, soft_kl

__all__ = ["AttentionTransfer", "DecoupledKD", "DistillLoss", "DistillOutputs", "FitNet", "HintonKD",
           "RelationalKD", "SimilarityPreserving", "soft_kl"]

"""Distillation losses, one file per family (Gou et al. 2021's taxonomy):
`response` (logits), `feature` (intermediate layers), `relation` (sample-to-sample structure).

Every loss is an `nn.Module` whose `forward(out: DistillOutputs)` returns a dict of named,
already weighted terms; the training module sums them and logs each as `train/loss_<name>`.
"""

from kdpipe.losses.base import DistillLoss, DistillOutputs
from kdpipe.losses.response import HintonKD, soft_kl

__all__ = ["DistillLoss", "DistillOutputs", "HintonKD", "soft_kl"]

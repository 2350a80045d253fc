"""Distillation loss terms, one file per family (Gou et al. 2021's taxonomy): `response`
(labels and logits), `feature` (intermediate layers), `relation` (sample-to-sample structure),
`token` (language models' per-token divergences).

Each term is one idea and returns one unweighted scalar; `WeightedSum` builds the loss from
`distill.terms` (`{name: {_target_, weight, ...}}`) and the training module logs every weighted
term as `train/loss_<name>`.
"""

from kdpipe.losses.base import DistillOutputs, LossTerm, WeightedSum
from kdpipe.losses.contrastive import ContrastiveRepresentation
from kdpipe.losses.feature import AttentionTransfer, Hint
from kdpipe.losses.regularize import WeightL1
from kdpipe.losses.relation import RKDAngle, RKDDistance, SimilarityPreserving
from kdpipe.losses.response import (
    CrossEntropy,
    InterClassRelation,
    IntraClassRelation,
    LogitStandardizedKL,
    NonTargetClassKD,
    SoftTargetKL,
    TargetClassKD,
    soft_kl,
)
from kdpipe.losses.token import ForwardKL, GeneralizedJSD, ReverseKL, SkewKL, TopK, token_rows
from kdpipe.losses.transformer import AttentionRelation, HiddenStateMSE

__all__ = ["AttentionRelation", "AttentionTransfer", "ContrastiveRepresentation", "CrossEntropy",
           "DistillOutputs", "ForwardKL", "GeneralizedJSD", "HiddenStateMSE", "Hint",
           "InterClassRelation", "IntraClassRelation", "LogitStandardizedKL", "LossTerm",
           "NonTargetClassKD", "RKDAngle", "RKDDistance", "ReverseKL", "SimilarityPreserving",
           "SkewKL", "SoftTargetKL", "TargetClassKD", "TopK", "WeightL1", "WeightedSum", "soft_kl",
           "token_rows"]

"""Fine-tuning after a compression step: keep distilling from the teacher when asked."""

from __future__ import annotations

from hydra.utils import instantiate
from torch import nn

from kdpipe.losses import WeightedSum
from kdpipe.models.io import load_model
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.stages.base import PipelineContext, StageOutput


def finetune_module(ctx: PipelineContext, model: nn.Module, teacher: StageOutput | None, distill: bool,
                    lr_scale: float) -> ClassifierModule:
    """A module that fine-tunes `model` at `lr_scale` times the learning rate: with the distill
    stage's terms against the teacher when `distill` is set and the scheme learns from a teacher,
    else on hard labels."""
    optim = ctx.optim(lr_scale)
    model.train()  # load_model returns eval mode, and Lightning keeps the mode it finds
    terms = ctx.cfg.distill.get("terms")
    from_teacher = getattr(instantiate(ctx.cfg.distill.scheme), "needs_teacher", True)
    if distill and teacher is not None and terms and from_teacher:
        return DistillationModule(model, load_model(teacher.path), WeightedSum.from_config(terms),
                                  ctx.num_classes, ctx.example_input, optim)
    return ClassifierModule(model, ctx.num_classes, optim)

"""Fine-tuning after a compression step: keep distilling from the teacher when asked."""

from __future__ import annotations

from hydra.utils import instantiate
from torch import nn

from kdpipe.models.io import load_model
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.stages.base import PipelineContext
from kdpipe.stages.train import optim_kwargs


def finetune_module(ctx: PipelineContext, model: nn.Module, distill_from_teacher: bool, lr_scale: float):
    """Fine-tuning keeps distilling from the teacher when asked to (and a teacher exists)."""
    optim = optim_kwargs(ctx)
    optim["lr"] = optim["lr"] * float(lr_scale)
    model.train()  # load_model returns eval mode, and Lightning keeps the mode it finds
    if distill_from_teacher and "teacher" in ctx.outputs and ctx.cfg.distill.get("loss") is not None:
        teacher = load_model(ctx.outputs["teacher"].path)
        return DistillationModule(model, teacher, instantiate(ctx.cfg.distill.loss), ctx.num_classes,
                                  ctx.example_input, **optim)
    return ClassifierModule(model, ctx.num_classes, **optim)

"""The teacher and distill stages: train (or load) a model with Lightning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
from torch import nn

from kdpipe.data.augment import build_augmentation
from kdpipe.faults import fitting, resume_from
from kdpipe.models.io import build_model, load_state_dict_any, save_model
from kdpipe.modules import ClassifierModule
from kdpipe.stages.base import PipelineContext, Product, StageOutput, run_stage


def optim_kwargs(ctx: PipelineContext) -> dict[str, Any]:
    return dict(ctx.section("optim"))


def fit(ctx: PipelineContext, stage: str, run_id: str, module, max_epochs: int, callbacks=(),
        train_loader=None) -> None:
    """Fit on the data module (or on `train_loader`, e.g. batches that carry cached teacher
    logits), resuming from the checkpoint an interrupted run of this stage left."""
    key = ctx.fit_key(stage)
    trainer = ctx.trainer(stage, run_id, max_epochs, callbacks, ckpt_key=key)
    ckpt = resume_from(ctx.checkpoint_root(), key, stage, ctx.interrupted.get(stage, [])) \
        if key and ctx.cfg.reuse else None
    try:
        with fitting():
            if train_loader is None:
                trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=ckpt, weights_only=True)
            else:
                trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=ctx.datamodule.val_dataloader(),
                            ckpt_path=ckpt, weights_only=True)
    except FloatingPointError as exc:  # a diverged loss: say which stage, keep the term and epoch
        raise FloatingPointError(f"stage {stage}: {exc}") from exc


def is_uri(ref: str) -> bool:
    return "://" in ref or ref.startswith(("runs:/", "models:/"))


def resolve_checkpoint(ref: str) -> Path:
    """A local file for a checkpoint given as a path or an MLflow artefact URI
    (`runs:/<run_id>/model/model.pt`). Nothing here goes through a shell."""
    if is_uri(ref):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref))
        if local.is_dir():
            files = sorted(local.rglob("*.pt")) + sorted(local.rglob("*.ckpt"))
            if not files:
                raise FileNotFoundError(f"no .pt or .ckpt file under {ref}")
            local = files[0]
        return local
    return Path(os.path.expanduser(ref))


def teacher_compute(ctx: PipelineContext, run_id: str) -> Product:
    tcfg = ctx.cfg.teacher
    arch = ctx.section("teacher")["model"]
    model: nn.Module = build_model(arch)
    if tcfg.get("checkpoint"):
        model.load_state_dict(load_state_dict_any(resolve_checkpoint(str(tcfg.checkpoint))))
        mlflow.set_tag("kdpipe.teacher_source", str(tcfg.checkpoint))
    else:
        augment = build_augmentation(ctx.section("data").get("augment"), ctx.datamodule.in_shape)
        for member in getattr(model, "members", None) or [model]:  # an ensemble's members train apart
            module = ClassifierModule(member, ctx.num_classes, augment=augment, **optim_kwargs(ctx))
            fit(ctx, "teacher", run_id, module, tcfg.max_epochs)
    return Product(save_model(model, arch, ctx.workdir / "teacher" / "model.pt"))


def run_teacher(ctx: PipelineContext) -> StageOutput:
    ckpt = ctx.cfg.teacher.get("checkpoint")
    extra = None
    if ckpt and not is_uri(str(ckpt)):
        st = Path(str(ckpt)).expanduser().stat()
        extra = {"checkpoint_size": st.st_size, "checkpoint_mtime": st.st_mtime_ns}
    return run_stage(ctx, "teacher", ["teacher", "trainer", "optim"], [], teacher_compute, extra_key=extra)


def distill_compute(ctx: PipelineContext, run_id: str) -> Product:
    from kdpipe.distill.schemes import compute_student  # every scheme: offline, online, self

    return compute_student(ctx, run_id)


def run_distill(ctx: PipelineContext) -> StageOutput:
    scratch = ctx.cfg.distill.get("loss") is None
    upstream = [] if scratch else [ctx.outputs["teacher"]]
    return run_stage(ctx, "distill", ["distill", "student", "trainer", "optim"], upstream, distill_compute)

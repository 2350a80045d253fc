"""The teacher and distill stages: train (or load) a model with Lightning."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from hydra.utils import instantiate
from torch import nn

from kdpipe.distill.schemes import DistillJob
from kdpipe.errors import ConfigError
from kdpipe.exits import student_arch
from kdpipe.models.io import build_model, load_model, load_state_dict_any, save_model
from kdpipe.modules import ClassifierModule
from kdpipe.preflight import sqlite_path, torch_file_problem
from kdpipe.stages.base import PipelineContext, Product, StageOutput, StageRun, run_stage
from kdpipe.tracking.store import file_sha256

TRAINING_SECTIONS = ["trainer", "optim", "callbacks"]


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


def fetch_teacher_checkpoint(ref: str, tracking_uri: str) -> Path:
    """The local file of `teacher.checkpoint` (a path, `file://`, `runs:/`, `models:/` or an HTTP
    artefact URI, looked up in the store `tracking_uri`), checked to be a torch checkpoint, or a
    one-line `ConfigError`: called before the pipeline creates anything in the store."""
    key = f"teacher.checkpoint={ref}"
    store = sqlite_path(tracking_uri)
    if ref.startswith(("runs:/", "models:/")) and store is not None and not store.is_file():
        raise ConfigError(f"{key}: the store {tracking_uri} does not exist, so it holds no run; point "
                          f"tracking.uri (or MLFLOW_TRACKING_URI) at the store of the teacher's run")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = resolve_checkpoint(ref)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{key} cannot be fetched ({reason}); give a file path or an MLflow URI of an "
                          f"existing run, e.g. runs:/<run_id>/model/model.pt") from None
    problem = torch_file_problem(local)
    if problem == "does not exist":
        raise ConfigError(f"{key} does not exist; give a file path or an MLflow URI "
                          f"(runs:/<run_id>/model/model.pt), or null to train the teacher")
    if problem:
        raise ConfigError(f"{key} {problem}")
    return local


def teacher_compute(run: StageRun) -> Product:
    ctx = run.ctx
    tcfg = ctx.cfg.teacher
    arch = ctx.section("teacher")["model"]
    model: nn.Module = build_model(arch)
    if tcfg.get("checkpoint"):
        model.load_state_dict(load_state_dict_any(ctx.teacher_file))
        mlflow.set_tag("kdpipe.teacher_source", str(tcfg.checkpoint))
    else:
        members = getattr(model, "members", None)  # an ensemble's members train apart
        for i, member in enumerate(members or [model]):
            module = ClassifierModule(member, ctx.num_classes, ctx.optim(), ctx.augment)
            run.fitter.fit(module, f"member{i}" if members else "teacher", int(tcfg.max_epochs))
    return Product(save_model(model, arch, ctx.workdir / "teacher" / "model.pt"))


def run_teacher(ctx: PipelineContext) -> StageOutput:
    """Train the teacher, or load `teacher.checkpoint` (keyed by the file's content, whatever
    the form of its reference: an overwritten file is loaded again)."""
    if ctx.cfg.teacher.get("checkpoint"):
        # A loaded teacher depends on the file and the data only: not on the seed, the optimiser or
        # the epochs, so students of every seed and setting share its run and its cached logits.
        extra = {"checkpoint_sha256": file_sha256(ctx.teacher_file),
                 "model": ctx.section("teacher").get("model")}
        return run_stage(ctx, "teacher", [], [], teacher_compute, extra_key=extra, seeded=False)
    return run_stage(ctx, "teacher", ["teacher", *TRAINING_SECTIONS], [], teacher_compute)


def run_distill(ctx: PipelineContext, teacher: StageOutput | None) -> StageOutput:
    """Train the student with `distill.scheme` (a `_target_` class: `kdpipe.distill.schemes`)."""
    scheme = instantiate(ctx.cfg.distill.scheme)
    uses_teacher = bool(getattr(scheme, "needs_teacher", True))
    if uses_teacher and teacher is None:
        raise ValueError(f"{type(scheme).__name__} distils from the teacher stage, but teacher is none")

    def compute(run: StageRun) -> Product:
        job = DistillJob(ctx.cfg.distill, student_arch(ctx.cfg), ctx.num_classes, ctx.example_input,
                         ctx.augment, run.fitter, ctx.datamodule, ctx.workdir, ctx.optim())
        if uses_teacher:
            job.teacher = load_model(teacher.path)
            job.teacher_run_id, job.teacher_key = teacher.reused_from or teacher.run_id, teacher.cache_key
        student = scheme.train(job)
        return Product(save_model(student, job.student_arch, ctx.workdir / "distill" / "model.pt"))

    upstream = [teacher] if uses_teacher else []
    # how the heads train is part of the student; when inputs leave (criterion, budget) is evaluate's
    arch = student_arch(ctx.cfg)
    heads = {k: arch[k] for k in ("head_width", "loss")} if "exits" in arch else None
    return run_stage(ctx, "distill", ["distill", "student", *TRAINING_SECTIONS], upstream, compute,
                     extra_key=heads)

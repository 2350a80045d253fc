"""What the distill stage trains for each `distill.scheme`.

- offline schemes (`kd`, `dkd`, `fitnet`, `attention`, `rkd`, `sp`): a student against the
  frozen teacher of the teacher stage, optionally through a teacher-assistant chain;
- `dml`: peers trained together from scratch; the teacher stage is not an input (it still runs
  when `teacher` is set, as the reference the evaluate stage compares compression against;
  `teacher=none` skips it);
- `self`: born-again generations or deep-to-shallow exits, also without the teacher stage;
- `none`: the scratch baseline.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kdpipe.data.augment import build_augmentation
from kdpipe.distill.cache import (
    CACHE_TAG,
    cache_blockers,
    cached_train_loader,
    teacher_train_logits,
    use_cache,
)
from kdpipe.losses import HintonKD
from kdpipe.losses.base import DistillLoss
from kdpipe.models import count_params
from kdpipe.models.ensemble import EnsembleTeacher
from kdpipe.models.io import build_model, load_model, save_model
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.modules.mutual import MutualLearningModule
from kdpipe.modules.self_distill import SelfDistillationModule
from kdpipe.stages.base import PipelineContext, Product
from kdpipe.stages.train import fit, optim_kwargs

log = logging.getLogger("kdpipe")

ONLINE_SCHEMES = ("dml", "self")


def chain_archs(ctx: PipelineContext) -> list[dict[str, Any]]:
    """`distill.chain` entries as model configs, with the data's shape filled in."""
    data = ctx.cfg.data
    out = []
    for spec in ctx.cfg.distill.get("chain") or []:
        spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, dict) else dict(spec)
        spec.setdefault("in_shape", [int(data.channels), int(data.height), int(data.width)])
        spec.setdefault("num_classes", int(data.num_classes))
        out.append(spec)
    return out


def capacity_gap_message(student: nn.Module, teacher: nn.Module, fraction: float) -> str | None:
    """Mirzadeh et al. (2020): past some teacher/student size ratio a better teacher makes a
    worse student; an intermediate 'teacher assistant' bridges the gap."""
    n_s, n_t = count_params(student)[0], count_params(teacher)[0]
    if n_t == 0 or n_s >= fraction * n_t:
        return None
    return (f"capacity gap: the student has {n_s:,} parameters, {100 * n_s / n_t:.1f}% of the teacher's {n_t:,} "
            f"(below distill.capacity_gap_fraction={fraction}); distillation can then do worse than training "
            f"from scratch (Mirzadeh et al. 2020). Consider a teacher-assistant chain, e.g. "
            f"'distill.chain=[{{_target_:kdpipe.models.cnn,width:16,depth:3}}]', more epochs, or a larger student")


def train_offline(ctx: PipelineContext, run_id: str, student: nn.Module, teacher: nn.Module, loss: DistillLoss,
                  optim: dict, cached=None, stage: str = "distill") -> DistillationModule:
    module = DistillationModule(student, teacher, loss, ctx.num_classes, ctx.example_input, **optim)
    epochs = int(ctx.cfg.distill.max_epochs)
    fit(ctx, stage, run_id, module, epochs, train_loader=None if cached is None else cached_train_loader(ctx, cached))
    return module


def _val_acc(module) -> float:
    return float(module.trainer.callback_metrics.get("val/acc", float("nan")))


def offline(ctx: PipelineContext, run_id: str, student: nn.Module, optim: dict) -> None:
    dcfg = ctx.cfg.distill
    teacher = load_model(ctx.outputs["teacher"].path)
    if isinstance(teacher, EnsembleTeacher):  # average the members' distributions at the KD temperature
        teacher.temperature = float(dcfg.get("temperature", 1.0))
    fraction = float(dcfg.get("capacity_gap_fraction", 0.05))
    for i, arch in enumerate(chain_archs(ctx)):
        assistant = build_model(arch)
        module = train_offline(ctx, run_id, assistant, teacher, instantiate(dcfg.loss), optim, stage=f"distill_ta{i}")
        mlflow.log_metric("chain/val_acc", _val_acc(module), step=i)
        teacher = assistant.eval()
    gap = capacity_gap_message(student, teacher, fraction)
    if gap:
        log.warning(gap)
        mlflow.set_tag("kdpipe.capacity_gap", f"{count_params(student)[0] / count_params(teacher)[0]:.4f}")
    loss = instantiate(dcfg.loss)
    augment = optim.get("augment") is not None
    cached = None
    if use_cache(dcfg.get("cache_teacher", "auto"), cache_blockers(augment, tuple(loss.teacher_layers),
                                                                   bool(dcfg.get("chain")))):
        suffix = f"_T{teacher.temperature:g}" if isinstance(teacher, EnsembleTeacher) else ""
        cached = teacher_train_logits(ctx, ctx.outputs["teacher"], teacher, suffix)
    else:
        mlflow.set_tag(CACHE_TAG, "off")
    train_offline(ctx, run_id, student, teacher, loss, optim, cached)


def born_again(ctx: PipelineContext, run_id: str, arch: dict, optim: dict) -> nn.Module:
    """Born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar 2018, eq. 1-2):
    generation 0 is trained on labels; generation k+1, same architecture, learns from
    generation k's outputs. Defaults follow the paper: pure teacher-matching (alpha=1) at T=1."""
    bcfg = ctx.cfg.distill.born_again
    model = build_model(arch)
    module = ClassifierModule(model, ctx.num_classes, **optim)
    fit(ctx, "distill_gen0", run_id, module, int(ctx.cfg.distill.max_epochs))
    mlflow.log_metric("self/generation_val_acc", _val_acc(module), step=0)
    for gen in range(1, int(bcfg.generations) + 1):
        student = build_model(arch)
        loss = HintonKD(float(bcfg.temperature), float(bcfg.alpha))
        module = train_offline(ctx, run_id, student, model.eval(), loss, optim, stage=f"distill_gen{gen}")
        mlflow.log_metric("self/generation_val_acc", _val_acc(module), step=gen)
        model = student
    return model


def compute_student(ctx: PipelineContext, run_id: str) -> Product:
    """The distill stage's product for any scheme: the trained student's model file."""
    dcfg = ctx.cfg.distill
    scheme = str(dcfg.get("scheme", "kd"))
    arch = ctx.section("student")["model"]
    augment = build_augmentation(ctx.section("data").get("augment"), ctx.datamodule.in_shape)
    optim = {**optim_kwargs(ctx), "augment": augment}
    epochs = int(dcfg.max_epochs)
    if scheme == "dml":
        peers = [build_model(arch) for _ in range(int(dcfg.peers))]
        fit(ctx, "distill", run_id, MutualLearningModule(peers, ctx.num_classes, float(dcfg.temperature), **optim), epochs)
        student = peers[0]
    elif scheme == "self" and dcfg.mode == "born_again":
        student = born_again(ctx, run_id, arch, optim)
    elif scheme == "self":
        d = dcfg.deep_to_shallow
        student = build_model(arch)
        module = SelfDistillationModule(student, ctx.num_classes, ctx.example_input, list(d.exit_layers),
                                        d.feature_layer, float(d.alpha), float(d.feature_weight),
                                        float(d.temperature), **optim)
        fit(ctx, "distill", run_id, module, epochs)
    elif dcfg.get("loss") is None:
        student = build_model(arch)
        fit(ctx, "distill", run_id, ClassifierModule(student, ctx.num_classes, **optim), epochs)
    else:
        student = build_model(arch)
        offline(ctx, run_id, student, optim)
    return Product(save_model(student, arch, ctx.workdir / "distill" / "model.pt"))

"""The prune and quantize stages."""

from __future__ import annotations

import json

import mlflow
from hydra.utils import instantiate

from kdpipe.compress.prune import layer_sparsity, magnitude_prune, make_permanent, sparsity
from kdpipe.compress.quantize import quantize_dynamic_int8
from kdpipe.export import export_onnx
from kdpipe.models.io import load_model, read_model_file, save_model
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.stages.base import PipelineContext, Product, StageOutput, run_stage
from kdpipe.stages.train import fit, optim_kwargs


def finetune_module(ctx: PipelineContext, model, distill_from_teacher: bool):
    """Fine-tuning keeps distilling from the teacher when asked to (and a teacher exists)."""
    optim = optim_kwargs(ctx)
    optim["lr"] = optim["lr"] * float(ctx.cfg.prune.get("finetune_lr_scale", 0.3))
    if distill_from_teacher and "teacher" in ctx.outputs and ctx.cfg.distill.get("loss") is not None:
        teacher = load_model(ctx.outputs["teacher"].path)
        return DistillationModule(model, teacher, instantiate(ctx.cfg.distill.loss), ctx.num_classes,
                                  ctx.example_input, **optim)
    return ClassifierModule(model, ctx.num_classes, **optim)


def prune_compute(ctx: PipelineContext, run_id: str) -> Product:
    pcfg = ctx.cfg.prune
    upstream = ctx.outputs["last"]
    model = load_model(upstream.path)
    arch = read_model_file(upstream.path)["arch"]
    magnitude_prune(model, float(pcfg.sparsity), scope=str(pcfg.scope))
    if int(pcfg.finetune_epochs) > 0:
        module = finetune_module(ctx, model, bool(pcfg.get("finetune_distill", False)))
        fit(ctx, "prune", run_id, module, int(pcfg.finetune_epochs))
    make_permanent(model)
    table = ctx.workdir / "prune" / "layer_sparsity.json"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps(layer_sparsity(model), indent=2))
    path = save_model(model, arch, ctx.workdir / "prune" / "model.pt")
    return Product(path, metrics={"prune/sparsity": sparsity(model)}, artifacts=[table])


def run_prune(ctx: PipelineContext) -> StageOutput:
    return run_stage(ctx, "prune", ["prune"], [ctx.outputs["last"]], prune_compute)


def quantize_compute(ctx: PipelineContext, run_id: str) -> Product:
    qcfg = ctx.cfg.quantize
    upstream = ctx.outputs["last"]
    model = load_model(upstream.path)
    fp32 = export_onnx(model, ctx.example_input, ctx.workdir / "quantize" / "model.fp32.onnx")
    mode = str(qcfg.mode)
    if mode == "dynamic":
        out = quantize_dynamic_int8(fp32, ctx.workdir / "quantize" / "model.int8.onnx",
                                    per_channel=bool(qcfg.get("per_channel", False)))
    else:
        raise ValueError(f"quantize.mode={mode!r} is not known; use dynamic")
    mlflow.set_tag("kdpipe.quantize_runtime", "onnxruntime")
    return Product(out, kind="onnx")


def run_quantize(ctx: PipelineContext) -> StageOutput:
    out = run_stage(ctx, "quantize", ["quantize"], [ctx.outputs["last"]], quantize_compute)
    out.source = ctx.outputs["last"]
    return out

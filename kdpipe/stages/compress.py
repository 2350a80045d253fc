"""The prune and quantize stages. Schedules, criteria and modes come from `conf/prune/` and
`conf/quantize/`; every number logged here is measured on the saved artefact."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import mlflow
from hydra.utils import instantiate
from torch import nn

from kdpipe.compress.prune import layer_table, magnitude_prune, make_permanent, sparsity
from kdpipe.compress.qat import FakeQuantCallback
from kdpipe.compress.quantize import quantize_dynamic_int8, quantize_static_int8
from kdpipe.compress.schedules import AGPCallback, step_targets
from kdpipe.compress.sparse_format import pack_state_dict
from kdpipe.compress.structured import StructuredPruner, export_plain_module
from kdpipe.export import export_onnx
from kdpipe.metrics.measure import torch_logits
from kdpipe.models import count_params
from kdpipe.models.io import load_model, read_model_file, save_model
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.stages.base import PipelineContext, Product, StageOutput, run_stage
from kdpipe.stages.train import fit, optim_kwargs

log = logging.getLogger("kdpipe")


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


def val_accuracy(ctx: PipelineContext, model: nn.Module) -> float:
    logits, target = torch_logits(model, ctx.datamodule.val_dataloader())
    return float((logits.argmax(-1) == target).float().mean())


def _taylor_gradients(ctx: PipelineContext, model: nn.Module, batches: int = 4):
    """Accumulate cross-entropy gradients on a few training batches (for Taylor importance)."""
    def run() -> None:
        for i, (x, y) in enumerate(ctx.datamodule.train_dataloader()):
            if i >= batches:
                break
            nn.functional.cross_entropy(model(x), y).backward()
    return run


def prune_compute(ctx: PipelineContext, run_id: str) -> Product:
    pcfg, sched, ft = ctx.cfg.prune, ctx.cfg.prune.schedule, ctx.cfg.prune.finetune
    upstream = ctx.outputs["last"]
    model = load_model(upstream.path)
    arch = read_model_file(upstream.path)["arch"]
    method, target = str(pcfg.method), float(pcfg.sparsity)
    params_before, _ = count_params(model)

    def finetune(epochs: int, callbacks=()) -> None:
        if epochs > 0:
            module = finetune_module(ctx, model, bool(ft.distill), float(ft.lr_scale))
            fit(ctx, "prune", run_id, module, epochs, callbacks)

    if str(sched.name) == "agp":  # a Lightning callback prunes while fine-tuning
        cb = AGPCallback(lambda s: magnitude_prune(model, s, scope=str(pcfg.scope)),
                         float(sched.initial_sparsity), target, float(sched.start_epoch),
                         float(sched.end_epoch), int(sched.frequency))
        finetune(int(ft.epochs), [cb])
        for step, s in cb.history:
            mlflow.log_metric("prune/schedule_sparsity", s, step=step)
    else:  # a loop of (prune step, fine-tune)
        targets = step_targets(str(sched.name), target, int(sched.get("steps", 1)))
        if method == "structured":
            pruner = StructuredPruner(model, ctx.example_input, targets, str(pcfg.importance),
                                      pcfg.get("ignore"), bool(pcfg.global_pruning),
                                      grad_batches=_taylor_gradients(ctx, model))
            prune_step = lambda _s: pruner.step()  # noqa: E731
        else:
            prune_step = lambda s: magnitude_prune(model, s, scope=str(pcfg.scope))  # noqa: E731
        for k, s in enumerate(targets, start=1):
            prune_step(s)
            finetune(int(ft.epochs))
            acc = val_accuracy(ctx, model)
            mlflow.log_metrics({"prune/step_target": s, "prune/step_val_acc": acc,
                                "prune/step_params": float(count_params(model)[0]),
                                "prune/step_sparsity": sparsity(model)}, step=k)
            log.info("prune step %d/%d: target %.3f, val/acc %.4f", k, len(targets), s, acc)
    make_permanent(model)
    model.eval()

    out_dir = ctx.workdir / "prune"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "layer_sparsity.csv"
    rows = layer_table(model)
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = {"prune/sparsity": sparsity(model)}
    if method == "structured":
        params_after, _ = count_params(model)
        metrics["prune/params_removed"] = 1.0 - params_after / params_before
        path = save_model(model, arch, out_dir / "model.pt", structured=True)
        plain = out_dir / "model.pt2"
        export_plain_module(model, ctx.example_input, plain)
        mlflow.log_artifact(str(plain), artifact_path="model_plain")
    elif str(pcfg.get("storage", "dense")) == "sparse":
        dense, packed = pack_state_dict(model.state_dict())
        path = save_model(model, arch, out_dir / "model.pt", state_dict=dense, sparse=packed)
    else:
        path = save_model(model, arch, out_dir / "model.pt")
    mlflow.set_tag("kdpipe.prune_method", method)
    return Product(path, metrics=metrics, artifacts=[table])


def run_prune(ctx: PipelineContext) -> StageOutput:
    return run_stage(ctx, "prune", ["prune", "distill", "trainer", "optim"], [ctx.outputs["last"]], prune_compute)


def qat_finetune(ctx: PipelineContext, run_id: str, model: nn.Module) -> None:
    """A few epochs with fake int8 in the forward pass so the weights settle where int8
    rounding costs least; the fake quantization is removed afterwards."""
    qcfg = ctx.cfg.quantize
    fake = FakeQuantCallback(model)
    module = finetune_module(ctx, model, bool(qcfg.distill), float(qcfg.lr_scale))
    fit(ctx, "quantize", run_id, module, int(qcfg.epochs), [fake])
    fake.detach()
    model.eval()


def quantize_compute(ctx: PipelineContext, run_id: str) -> Product:
    qcfg = ctx.cfg.quantize
    upstream = ctx.outputs["last"]
    model = load_model(upstream.path)
    mode = str(qcfg.mode)
    out_dir = ctx.workdir / "quantize"
    if mode == "qat":
        qat_finetune(ctx, run_id, model)
    fp32 = export_onnx(model, ctx.example_input, out_dir / "model.fp32.onnx")
    op_types = list(qcfg.op_types) if qcfg.get("op_types") else None
    if mode == "dynamic":
        out = quantize_dynamic_int8(fp32, out_dir / "model.int8.onnx",
                                    per_channel=bool(qcfg.get("per_channel", False)), op_types=op_types)
    elif mode in ("static", "qat"):
        cal = qcfg.calibration
        out, samples = quantize_static_int8(
            fp32, out_dir / "model.int8.onnx", ctx.datamodule.train_dataloader(), int(cal.num_batches),
            method=str(cal.method), per_channel=bool(qcfg.per_channel), min_samples=int(cal.min_samples),
            op_types=op_types)
        mlflow.log_metric("quantize/calibration_samples", float(samples))
    else:
        raise ValueError(f"quantize.mode={mode!r} is not known; use dynamic, static or qat")
    mlflow.set_tag("kdpipe.quantize_runtime", "onnxruntime")
    mlflow.log_metric("quantize/fp32_onnx_bytes", float(Path(fp32).stat().st_size))
    if mode == "qat":  # the QAT-tuned fp32 weights, for export or a later conversion
        tuned = save_model(model, read_model_file(upstream.path)["arch"], out_dir / "model.qat_fp32.pt",
                           structured=bool(read_model_file(upstream.path).get("structured", False)))
        mlflow.log_artifact(str(tuned), artifact_path="model_qat_fp32")
    return Product(out, kind="onnx")


def run_quantize(ctx: PipelineContext) -> StageOutput:
    out = run_stage(ctx, "quantize", ["quantize", "distill", "trainer", "optim"], [ctx.outputs["last"]],
                    quantize_compute)
    out.source = ctx.outputs["last"]
    return out


"""The quantize stage: int8 with ONNX Runtime (dynamic, static, or after QAT fine-tuning); every
number logged here is measured on the saved artefact."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from torch import nn

from kdpipe.compress.qat import FakeQuantCallback
from kdpipe.compress.quantize import quantize_dynamic_int8, quantize_static_int8
from kdpipe.export import export_onnx
from kdpipe.models.io import load_model, read_model_file, save_model
from kdpipe.stages.base import PipelineContext, Product, StageOutput, StageRun, run_stage
from kdpipe.stages.finetune import finetune_module
from kdpipe.stages.train import TRAINING_SECTIONS

log = logging.getLogger("kdpipe")


def qat_finetune(run: StageRun, model: nn.Module, teacher: StageOutput | None) -> None:
    """A few epochs with fake int8 in the forward pass so the weights settle where int8
    rounding costs least; the fake quantization is removed afterwards."""
    qcfg = run.ctx.cfg.quantize
    fake = FakeQuantCallback(model)
    module = finetune_module(run.ctx, model, teacher, bool(qcfg.distill), float(qcfg.lr_scale))
    run.fitter.fit(module, "qat", int(qcfg.epochs), [fake], resumable=False)
    fake.detach()
    model.eval()


def quantize_compute(run: StageRun, upstream: StageOutput, teacher: StageOutput | None) -> Product:
    ctx = run.ctx
    qcfg = ctx.cfg.quantize
    model = load_model(upstream.path)
    mode = str(qcfg.mode)
    out_dir = ctx.workdir / "quantize"
    if mode == "qat":
        qat_finetune(run, model, teacher)
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


def run_quantize(ctx: PipelineContext, upstream: StageOutput, teacher: StageOutput | None) -> StageOutput:
    """Quantize the model of `upstream`; the output keeps it as `source` (the fp32 model)."""
    out = run_stage(ctx, "quantize", ["quantize", "distill", *TRAINING_SECTIONS], [upstream],
                    lambda run: quantize_compute(run, upstream, teacher))
    out.source = upstream
    return out

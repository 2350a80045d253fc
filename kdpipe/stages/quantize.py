"""The quantize stage: int8 with ONNX Runtime (dynamic, static, or after QAT fine-tuning); every
number logged here is measured on the saved artefact."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
from torch import nn
from torch.utils.data import TensorDataset

from kdpipe.compress import lowbit
from kdpipe.compress.budget import (
    back_off,
    int8_sensitivity,
    layer_labels,
    log_backoff,
    log_sensitivity,
    quantizable_nodes,
)
from kdpipe.compress.qat import FakeQuantCallback
from kdpipe.compress.quantize import quantize_dynamic_int8, quantize_static_int8, read_calibration
from kdpipe.compress.slim import slim_onnx
from kdpipe.export import export_onnx
from kdpipe.metrics.measure import onnx_logits, torch_logits
from kdpipe.models.io import load_model, read_model_file, save_model
from kdpipe.stages.base import PipelineContext, Product, StageOutput, StageRun, run_stage
from kdpipe.stages.finetune import finetune_module
from kdpipe.stages.train import TRAINING_SECTIONS

log = logging.getLogger("kdpipe")


def qat_finetune(run: StageRun, model: nn.Module, teacher: StageOutput | None, upstream: StageOutput) -> None:
    """A few epochs with fake int8 in the forward pass so the weights settle where int8
    rounding costs least, distilling from the teacher or from the fp32 model itself
    (`quantize.distill_from`); the fake quantization is removed afterwards."""
    qcfg = run.ctx.cfg.quantize
    fake = FakeQuantCallback(model)
    source = upstream if str(qcfg.get("distill_from", "teacher")) == "input" else teacher
    module = finetune_module(run.ctx, model, source, bool(qcfg.distill), float(qcfg.lr_scale))
    run.fitter.fit(module, "qat", int(qcfg.epochs), [fake], resumable=False)
    fake.detach()
    model.eval()


def calibration_loader(ctx: PipelineContext, model: nn.Module | None):
    """The batches static int8 calibrates on: the training split's, or (`calibration.source=synthetic`)
    inputs synthesised from `model` itself by DeepInversion, balanced over the classes, no data read."""
    cal = ctx.cfg.quantize.calibration
    if str(cal.get("source", "train")) != "synthetic":
        return ctx.datamodule.train_dataloader()
    from kdpipe.datafree.deepinversion import synthesize

    dm = ctx.datamodule
    n = int(cal.num_batches) * int(dm.batch_size)
    images, _ = synthesize(model, n, tuple(ctx.example_input.shape[1:]), ctx.num_classes,
                           batch_size=int(dm.batch_size), seed=int(ctx.cfg.seed),
                           **dict(cal.get("synthetic") or {}))
    mlflow.set_tag("kdpipe.calibration_source", "synthetic")
    return dm._loader(TensorDataset(images), shuffle=False)


def int8_quantizer(ctx: PipelineContext, fp32: Path,
                   model: nn.Module | None = None) -> Callable[[Path, list[str]], Path]:
    """`quantize(out_path, exclude)`: the configured int8 mode applied to `fp32` with the ONNX nodes
    in `exclude` left fp32. Static calibration batches are read once and reused by every call."""
    qcfg = ctx.cfg.quantize
    mode = str(qcfg.mode)
    op_types = list(qcfg.op_types) if qcfg.get("op_types") else None
    if mode == "dynamic":
        per_channel = bool(qcfg.get("per_channel", False))
        return lambda out, exclude: quantize_dynamic_int8(fp32, out, per_channel=per_channel,
                                                          op_types=op_types, exclude=exclude)
    if mode not in ("static", "qat"):
        raise ValueError(f"quantize.mode={mode!r} is not known; use dynamic, static or qat")
    cal = qcfg.calibration
    batches, samples = read_calibration(calibration_loader(ctx, model), fp32, int(cal.num_batches),
                                        int(cal.min_samples))
    mlflow.log_metric("quantize/calibration_samples", float(samples))
    return lambda out, exclude: quantize_static_int8(
        fp32, out, None, 0, method=str(cal.method), per_channel=bool(qcfg.per_channel), op_types=op_types,
        exclude=exclude, batches=batches)[0]


def quantize_to_budget(run: StageRun, model: nn.Module, fp32: Path, quantize: Callable,
                       teacher: StageOutput | None, out: Path) -> None:
    """Per-layer sensitivity (`compress.sensitivity`: only one layer int8 at a time) and, with
    `compress.max_acc_drop`, the back-off: every layer int8, then the most sensitive kept fp32 one by
    one until the validation accuracy is within budget. `out` is the candidate that shipped."""
    ctx, ccfg = run.ctx, run.ctx.cfg.compress
    qcfg = ctx.cfg.quantize
    folder = out.parent / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    val = ctx.datamodule.val_dataloader()

    def val_acc(path: Path) -> float:
        logits, target = onnx_logits(path, val)
        return float((logits.argmax(-1) == target).float().mean())

    nodes = quantizable_nodes(fp32, list(qcfg.op_types) if qcfg.get("op_types") else None)
    labels = layer_labels(fp32, model)
    base = val_acc(fp32)
    mlflow.log_metric("budget/fp32_val_acc", base)
    rows = int8_sensitivity(nodes, quantize, val_acc, base, labels, folder)
    log_sensitivity(rows, "quantize")
    if ccfg.max_acc_drop is None:
        quantize(out, [])
        shutil.rmtree(folder)
        return
    if str(ccfg.reference) == "teacher":
        if teacher is None:
            raise ValueError("compress.reference=teacher, but this pipeline has no teacher (distill=none); "
                             "use compress.reference=input")
        logits, target = torch_logits(load_model(teacher.path), val)
        reference, name = float((logits.argmax(-1) == target).float().mean()), "teacher"
    else:
        reference, name = base, "model entering the stage"
    order = [r["node"] for r in sorted(rows, key=lambda r: -r["drop_points"])]
    result = back_off(order, lambda kept, step: val_acc(quantize(folder / f"candidate-{step}.onnx", kept)),
                      reference, float(ccfg.max_acc_drop), labels)
    log_backoff(result, name, reference, float(ccfg.max_acc_drop))
    shutil.copyfile(folder / f"candidate-{result.chosen}.onnx", out)
    shutil.rmtree(folder)  # the candidates' accuracies are logged; their files are not needed


def lowbit_compute(run: StageRun, upstream: StageOutput, teacher: StageOutput | None) -> Product:
    """Weights below int8 (`quantize=int4|binary|kmeans`): the chosen layers are parametrized so the
    forward pass sees the low-bit weights, optionally fine-tuned (straight-through for int4/binary,
    shared centroids for kmeans), then stored packed in the model file."""
    ctx, qcfg = run.ctx, run.ctx.cfg.quantize
    fmt = str(qcfg.mode)
    model = load_model(upstream.path)
    layers = lowbit.target_layers(model, bool(qcfg.get("skip_first_last", False)))
    bits, group_size = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 32) or 1)
    lowbit.attach(model, layers, fmt, bits, group_size)
    if int(qcfg.epochs) > 0:
        source = upstream if str(qcfg.get("distill_from", "teacher")) == "input" else teacher
        module = finetune_module(ctx, model, source, bool(qcfg.distill), float(qcfg.lr_scale))
        run.fitter.fit(module, fmt, int(qcfg.epochs), [], resumable=False)
    model.eval()
    logits, target = torch_logits(model, ctx.datamodule.val_dataloader())
    state, packed = lowbit.pack_model(model, layers, fmt, bits, group_size)
    info = read_model_file(upstream.path)
    path = save_model(model, info["arch"], ctx.workdir / "quantize" / f"model.{fmt}.pt", state_dict=state,
                      lowbit=packed, structured=bool(info.get("structured", False)))
    weight_bytes = sum(map(lowbit.stored_bytes, packed.values()))
    mlflow.log_metrics({"quantize/val_acc": float((logits.argmax(-1) == target).float().mean()),
                        "quantize/lowbit_layers": float(len(layers)),
                        "quantize/lowbit_weight_bytes": float(weight_bytes)})
    mlflow.set_tags({"kdpipe.quantize_runtime": "decoded to fp32 on load (no native low-bit kernel)",
                     "kdpipe.lowbit_layers": ", ".join(layers)})
    return Product(path, kind="torch")


def quantize_compute(run: StageRun, upstream: StageOutput, teacher: StageOutput | None) -> Product:
    ctx = run.ctx
    qcfg, ccfg = ctx.cfg.quantize, ctx.cfg.compress
    mode = str(qcfg.mode)
    if mode in lowbit.FORMATS:
        return lowbit_compute(run, upstream, teacher)
    model = load_model(upstream.path)
    out_dir = ctx.workdir / "quantize"
    if mode == "qat":
        qat_finetune(run, model, teacher, upstream)
    fp32 = export_onnx(model, ctx.example_input, out_dir / "model.fp32.onnx")
    quantize = int8_quantizer(ctx, fp32, model)
    out = out_dir / "model.int8.onnx"
    if ccfg.sensitivity or ccfg.max_acc_drop is not None:
        quantize_to_budget(run, model, fp32, quantize, teacher, out)
    else:
        quantize(out, [])
    slim_onnx(out)  # the shipped file holds the model only: model/size_bytes measures it
    mlflow.set_tag("kdpipe.quantize_runtime", "onnxruntime")
    mlflow.log_metric("quantize/fp32_onnx_bytes", float(Path(fp32).stat().st_size))
    if mode == "qat":  # the QAT-tuned fp32 weights, for export or a later conversion
        tuned = save_model(model, read_model_file(upstream.path)["arch"], out_dir / "model.qat_fp32.pt",
                           structured=bool(read_model_file(upstream.path).get("structured", False)))
        mlflow.log_artifact(str(tuned), artifact_path="model_qat_fp32")
    return Product(out, kind="onnx")


def run_quantize(ctx: PipelineContext, upstream: StageOutput, teacher: StageOutput | None) -> StageOutput:
    """Quantize the model of `upstream`; the output keeps it as `source` (the fp32 model)."""
    by_teacher = teacher is not None and ctx.cfg.compress.max_acc_drop is not None \
        and str(ctx.cfg.compress.reference) == "teacher"
    out = run_stage(ctx, "quantize", ["quantize", "compress", "distill", *TRAINING_SECTIONS],
                    [upstream, teacher] if by_teacher else [upstream],
                    lambda run: quantize_compute(run, upstream, teacher))
    out.source = upstream
    return out

"""The evaluate stage: measure every model the pipeline produced, on one runtime."""

from __future__ import annotations

import csv
import functools
import json
import logging
import time
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torchmetrics.functional.classification import multiclass_calibration_error

from kdpipe.exits.evaluate import measure_exits
from kdpipe.exits.model import EarlyExitNet
from kdpipe.export import export_onnx
from kdpipe.faults import stop_if_terminated
from kdpipe.metrics.measure import flops_per_sample, onnx_latency_ms, onnx_logits, torch_logits
from kdpipe.models import count_params
from kdpipe.models.io import load_model
from kdpipe.models.multitask import task_rows
from kdpipe.report.tables import fmt, markdown_table
from kdpipe.stages.base import PipelineContext, StageOutput, StageRun, run_stage

LATENCY_RUNTIME = "onnxruntime-cpu-1thread"
# On the run that holds a model's artefact: its test/val metrics as JSON. They are a function of the
# model file and the data, which the run's cache key pins (the stage's config, the data's
# fingerprint, kdpipe's code), so a pipeline that reuses the run reads them instead of running the
# model over both splits again. Latency, a measurement of the machine, is always measured afresh.
ACCURACY_TAG = "kdpipe.eval_accuracy"
log = logging.getLogger("kdpipe")


def split_metrics(split: str, logits: torch.Tensor, target: torch.Tensor, num_classes: int,
                  perplexity: bool = False, task_ranges: dict | None = None) -> dict:
    """Accuracy and expected calibration error (15 bins) of one split's logits (a language model's:
    per token, with its perplexity, exp of the mean next-token cross-entropy)."""
    ece = multiclass_calibration_error(logits.softmax(-1), target, num_classes, n_bins=15)
    out = {f"{split}/acc": float((logits.argmax(-1) == target).float().mean()), f"{split}/ece": float(ece)}
    if perplexity:
        out[f"{split}/ppl"] = float(torch.exp(F.cross_entropy(logits.float(), target)))
    for name, rows in task_rows(target, task_ranges):  # multi-task data: each task's accuracy
        out[f"{split}/acc_{name}"] = float((logits[rows].argmax(-1) == target[rows]).float().mean())
    return out


def measure(ctx: PipelineContext, out: StageOutput) -> dict[str, float]:
    """The `test/*`, `val/*`, `model/*`, `latency/*` and `throughput/*` metrics of one model. The
    validation split's accuracy is what a search optimises (`optimized_metric: val/acc`), so the
    test split is only ever reported."""
    ecfg = ctx.cfg.eval
    example = ctx.example_input
    if out.kind == "onnx":
        onnx_path, torch_model = out.path, load_model(out.source.path)
        logits_of = functools.partial(onnx_logits, out.path)
    else:
        torch_model = load_model(out.path)
        logits_of = functools.partial(torch_logits, torch_model)
        onnx_path = export_onnx(torch_model, example, ctx.workdir / "evaluate" / f"{out.stage}.onnx")
    accuracy = split_accuracy(ctx, out, logits_of)
    params, nonzero = count_params(torch_model)
    lat = onnx_latency_ms(onnx_path, example, warmup=int(ecfg.latency_warmup), iters=int(ecfg.latency_iters))
    thr = onnx_latency_ms(onnx_path, example, warmup=3, iters=max(5, int(ecfg.latency_iters) // 10),
                          batch_size=int(ecfg.throughput_batch_size), threads=1)
    exits = {}
    if isinstance(torch_model, EarlyExitNet):  # measured again as it ships: stopping early
        quantize = ctx.section("quantize") if out.kind == "onnx" else None
        exits = measure_exits(torch_model, onnx_path, ctx.datamodule, example, exits_folder(ctx, out),
                              ctx.section("exits"), quantize)
    return {
        **accuracy,
        "model/params": float(params),
        "model/nonzero_params": float(nonzero),
        "model/size_bytes": float(Path(out.path).stat().st_size),
        "model/flops": float(flops_per_sample(torch_model, example)),
        "latency/p50_ms": lat["p50_ms"],
        "latency/p90_ms": lat["p90_ms"],
        "throughput/samples_per_s": thr["throughput"],
        **exits,
    }


def split_accuracy(ctx: PipelineContext, out: StageOutput, logits_of) -> dict[str, float]:
    """The test/val metrics of one model: read from the run that made it when an earlier pipeline
    measured them there (`ACCURACY_TAG`), else computed and recorded on that run."""
    client, origin = MlflowClient(), out.reused_from or out.run_id
    saved = client.get_run(origin).data.tags.get(ACCURACY_TAG) if out.reused_from else None
    if saved is not None:
        log.info("evaluate: %s's test and val metrics as measured on run %s", out.stage, origin)
        return json.loads(saved)
    accuracy, dm = {}, ctx.datamodule
    for split, loader in (("test", dm.test_dataloader()), ("val", dm.val_dataloader())):
        accuracy.update(split_metrics(split, *logits_of(loader), ctx.num_classes,
                                      getattr(dm, "kind", "") == "lm", getattr(dm, "task_ranges", None)))
    client.set_tag(origin, ACCURACY_TAG, json.dumps(accuracy))
    return accuracy


def exits_folder(ctx: PipelineContext, out: StageOutput) -> Path:
    """Where an early-exit model's segments, policy and trade-off plot are written."""
    return ctx.workdir / "evaluate" / f"{out.stage}_exits"


def write_tables(rows: list[dict], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # a model with exits has more
    csv_path = folder / "models.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md_path = folder / "models.md"
    md_path.write_text(markdown_table(columns, [[fmt(row.get(c, "")) for c in columns] for row in rows]))
    json_path = folder / "models.json"
    json_path.write_text(json.dumps(rows, indent=2))
    return [csv_path, md_path, json_path]


def evaluate_compute(ctx: PipelineContext, models: list[StageOutput]) -> list[dict]:
    client = MlflowClient()
    rows = []
    for out in models:
        stop_if_terminated()
        torch.manual_seed(0)
        metrics = measure(ctx, out)
        now = int(time.time() * 1000)
        # a training stage's run has its per-epoch val/* curve already: this point would join it
        has = client.get_run(out.run_id).data.metrics
        client.log_batch(out.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()
                                              if not (k.startswith("val/") and k in has)])
        client.set_tag(out.run_id, "kdpipe.latency_runtime", LATENCY_RUNTIME)
        if any(k.startswith("exits/") for k in metrics):
            client.log_artifacts(out.run_id, str(exits_folder(ctx, out)), "exits")
        rows.append({"stage": out.stage, "kind": out.kind, "run_id": out.run_id, **metrics})
    return rows


def run_evaluate(ctx: PipelineContext, models: list[StageOutput]) -> list[dict]:
    """Measure every model of the pipeline, in order; one row each. Evaluate is always measured
    afresh (latency is not a pure function), but its run carries a cache key like every stage."""
    rows: list[dict] = []

    def compute(run: StageRun) -> None:
        rows.extend(evaluate_compute(ctx, models))
        mlflow.set_tag("kdpipe.latency_runtime", LATENCY_RUNTIME)
        for path in write_tables(rows, ctx.workdir / "evaluate"):
            mlflow.log_artifact(str(path), artifact_path="tables")

    run_stage(ctx, "evaluate", ["eval"], models, compute, reusable=False)
    return rows

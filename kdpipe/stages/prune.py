"""The prune stage: a pruner stepped on a schedule by one callback, in one fine-tuning fit; every
number logged here is measured on the saved artefact."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow

from kdpipe.compress import prune_model, target
from kdpipe.compress.allocate import layer_plan
from kdpipe.compress.budget import back_off, log_backoff, log_sensitivity, prune_sensitivity
from kdpipe.compress.quantize import quantize_dynamic_int8, quantize_static_int8, read_calibration
from kdpipe.compress.save import save_pruned
from kdpipe.compress.slim import slim_onnx
from kdpipe.errors import ConfigError, build
from kdpipe.metrics.measure import onnx_latency_ms, torch_logits
from kdpipe.models.io import load_model, read_model_file
from kdpipe.modules import DistillationModule
from kdpipe.report.tables import fmt, markdown_table
from kdpipe.stages.base import PipelineContext, Product, StageOutput, StageRun, run_stage
from kdpipe.stages.finetune import finetune_module
from kdpipe.stages.train import TRAINING_SECTIONS

log = logging.getLogger("kdpipe")


def val_accuracy(ctx: PipelineContext, model) -> float:
    logits, labels = torch_logits(model, ctx.datamodule.val_dataloader())
    return float((logits.argmax(-1) == labels).float().mean())


def prune_compute(run: StageRun, upstream: StageOutput, teacher: StageOutput | None) -> Product:
    ctx = run.ctx
    pcfg, ft, ccfg = ctx.cfg.prune, ctx.cfg.prune.finetune, ctx.cfg.compress
    budget = ccfg.get("max_acc_drop")
    rows = []
    if ccfg.sensitivity or budget is not None:
        rows = prune_sensitivity(load_model(upstream.path), pcfg.pruner, ctx.example_input,
                                 lambda m: val_accuracy(ctx, m), list(ccfg.sensitivity_sparsities),
                                 ctx.datamodule.train_dataloader())
        log_sensitivity(rows, "prune")
    plan = {}  # compress.allocation=sensitivity: each layer's share of the sparsity
    if str(ccfg.get("allocation", "uniform")) == "sensitivity":
        plan = {"layer_scale": allocation_plan(ctx, load_model(upstream.path))}
    aimed = {}  # a target replaces prune.sparsity with the sparsity that meets it
    if ccfg.get("target_latency_ms") is not None or ccfg.get("target_size_bytes") is not None:
        aimed["sparsity"] = sparsity_for_target(ctx, load_model(upstream.path), plan)
    source = upstream if str(ft.get("distill_from", "teacher")) == "input" else teacher
    attempts: dict[int, tuple] = {}

    def attempt(kept: list[str], step: int) -> float:
        """Prune and fine-tune the model entering the stage with the layers `kept` left whole."""
        model = load_model(upstream.path)
        pruner = build(pcfg.pruner, "prune.pruner", model=model, example_inputs=ctx.example_input, **plan)
        if kept:  # the configured pruner again, told to leave the kept layers alone too
            rest = {"layer_scale": {k: v for k, v in plan["layer_scale"].items() if k not in kept}} \
                if plan else {}
            pruner = build(pcfg.pruner, "prune.pruner", model=model, example_inputs=ctx.example_input,
                           ignore=[*getattr(pruner, "ignored", ()), *kept], **rest)
        schedule = build(pcfg.schedule, "prune.schedule", **aimed)

        def finetune(callbacks, epochs: int) -> None:
            module = finetune_module(ctx, model, source, bool(ft.distill), float(ft.lr_scale))
            teacher_of = str(ft.get("distill_from", "teacher"))
            mlflow.set_tag("kdpipe.finetune_from",
                           teacher_of if isinstance(module, DistillationModule) else "labels")
            run.fitter.fit(module, "finetune" if step == 0 else f"finetune{step}", epochs, callbacks,
                           resumable=False)

        attempts[step] = (model, pruner, prune_model(pruner, schedule, finetune))
        return val_accuracy(ctx, model) if budget is not None else 0.0

    if budget is None:
        attempt([], 0)
        chosen = 0
    else:
        if str(ccfg.reference) == "teacher" and teacher is not None:
            reference, name = val_accuracy(ctx, load_model(teacher.path)), "teacher"
        else:
            reference, name = val_accuracy(ctx, load_model(upstream.path)), "model entering the stage"
        worst = {}  # each layer's largest drop over the sensitivity sparsities: the back-off order
        for r in rows:
            worst[r["layer"]] = max(worst.get(r["layer"], float("-inf")), r["drop_points"])
        order = sorted(worst, key=lambda layer: -worst[layer])
        result = back_off(order, attempt, reference, float(budget))
        log_backoff(result, name, reference, float(budget), what="pruning")
        chosen = result.chosen
    model, pruner, metrics = attempts[chosen]
    files = save_pruned(model, read_model_file(upstream.path)["arch"], ctx.workdir / "prune",
                        pruner.structural, str(pcfg.get("storage", "dense")), ctx.example_input)
    if files.plain is not None:
        mlflow.log_artifact(str(files.plain), artifact_path="model_plain")
    mlflow.set_tag("kdpipe.prune_method", str(pcfg.method))
    return Product(files.model, metrics=metrics, artifacts=[files.table])


def allocation_plan(ctx: PipelineContext, model) -> dict[str, float]:
    """`compress.allocation=sensitivity`: each prunable layer pruned alone to `allocation_probe` of its
    channels, its validation accuracy and fp32 ONNX Runtime latency measured, and its share of the
    sparsity set from them (`kdpipe.compress.allocate`); logged as `allocation/plan.md` and `.json`."""
    ccfg, ecfg = ctx.cfg.compress, ctx.cfg.eval

    def latency(m) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            path = target.shipped_form(m.eval(), ctx.example_input, Path(tmp), None)
            lat = onnx_latency_ms(path, ctx.example_input, warmup=int(ecfg.latency_warmup),
                                  iters=int(ecfg.latency_iters))
        return {"latency_ms": lat["p50_ms"]}

    rows = prune_sensitivity(model, ctx.cfg.prune.pruner, ctx.example_input, lambda m: val_accuracy(ctx, m),
                             [float(ccfg.get("allocation_probe", 0.5))], ctx.datamodule.train_dataloader(),
                             measure=latency)
    widths = {path: int(m.weight.shape[0]) for path, m in model.named_modules() if hasattr(m, "weight")
              and m.weight is not None and m.weight.dim() > 1}
    plan = layer_plan(rows, widths)
    table = [{"layer": r["layer"], "drop_points": r["drop_points"],
              "latency_saved_ms": r["base_latency_ms"] - r["latency_ms"], "scale": plan[r["layer"]]}
             for r in rows]
    folder = ctx.workdir / "prune" / "allocation"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(table, indent=2))
    cells = [[fmt(v) for v in row.values()] for row in table]
    (folder / "plan.md").write_text(markdown_table(list(table[0]), cells))
    for f in ("plan.json", "plan.md"):
        mlflow.log_artifact(str(folder / f), artifact_path="allocation")
    log.info("allocation: %s", ", ".join(f"{k} x{v:.2f}" for k, v in plan.items()))
    return plan


def sparsity_for_target(ctx: PipelineContext, model, plan: dict | None = None) -> float:
    """The lowest sparsity whose one-cut candidate meets `compress.target_latency_ms` /
    `target_size_bytes` (less `target_margin`) in the form that ships; logged as `target/*`."""
    ccfg, ecfg = ctx.cfg.compress, ctx.cfg.eval
    latency, size = ccfg.get("target_latency_ms"), ccfg.get("target_size_bytes")
    keep = 1.0 - float(ccfg.get("target_margin", 0.0))
    mode = str(ctx.cfg.quantize.get("mode", "none"))
    quantize = None
    if mode in ("static", "qat", "dynamic"):
        batches, _ = [], 0

        def quantize(fp32, out):
            if mode == "dynamic":
                return quantize_dynamic_int8(fp32, out)
            if not batches:
                batches.extend(read_calibration(ctx.datamodule.train_dataloader(), fp32, 2, 0)[0])
            path = quantize_static_int8(fp32, out, None, 0, batches=batches)[0]
            return slim_onnx(path)

    def meets(c) -> bool:
        return ((latency is None or c.latency_ms <= keep * float(latency))
                and (size is None or c.size_bytes <= keep * float(size)))

    def at(s: float):
        return target.measure(model, ctx.cfg.prune.pruner, s, ctx.example_input, quantize,
                              int(ecfg.latency_warmup), int(ecfg.latency_iters), 1, 1, **(plan or {}))

    try:
        chosen, tried = target.search_sparsity(at, meets, float(ccfg.get("max_sparsity", 0.9)))
    except target.TargetNotReachable as exc:
        wanted = " and ".join(f"{k}={v}" for k, v in (("compress.target_latency_ms", latency),
                                                       ("compress.target_size_bytes", size)) if v is not None)
        raise ConfigError(f"{wanted} cannot be met by pruning: {exc}; raise the target or "
                          f"compress.max_sparsity") from None
    warning = target.warn_if_flops_fall_but_latency_does_not(tried[0], chosen)
    mlflow.log_metric("target/chosen_sparsity", chosen.sparsity)
    mlflow.set_tag("kdpipe.target", f"sparsity {chosen.sparsity:.3f}: {chosen.latency_ms:.4f} ms, "
                                    f"{chosen.size_bytes} bytes" + (f"; {warning}" if warning else ""))
    log.info("target: pruning to sparsity %.3f (%.4f ms, %d bytes before fine-tuning)", chosen.sparsity,
             chosen.latency_ms, chosen.size_bytes)
    return chosen.sparsity


def run_prune(ctx: PipelineContext, upstream: StageOutput, teacher: StageOutput | None) -> StageOutput:
    """Prune the model of `upstream`; fine-tuning distils from `teacher`, or from the uncompressed
    `upstream` itself (`prune.finetune.distill_from=input`), when configured."""
    ccfg = ctx.cfg.compress  # a target is measured with eval's latency settings and the quantize mode
    timed = ["eval", "quantize"] if ccfg.get("target_latency_ms") is not None \
        or ccfg.get("target_size_bytes") is not None else []
    return run_stage(ctx, "prune", ["prune", "compress", "distill", *timed, *TRAINING_SECTIONS], [upstream],
                     lambda run: prune_compute(run, upstream, teacher))

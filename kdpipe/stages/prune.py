"""The prune stage: a pruner stepped on a schedule while fine-tuning; every number logged here
is measured on the saved artefact."""

from __future__ import annotations

import csv
import logging

import mlflow
from torch import nn

from kdpipe.compress.prune import layer_table, magnitude_prune, make_permanent, sparsity
from kdpipe.compress.schedules import AGPCallback, step_targets
from kdpipe.compress.sparse_format import pack_state_dict
from kdpipe.compress.structured import StructuredPruner, export_plain_module
from kdpipe.metrics.measure import torch_logits
from kdpipe.models import count_params
from kdpipe.models.io import load_model, read_model_file, save_model
from kdpipe.stages.base import PipelineContext, Product, StageOutput, StageRun, run_stage
from kdpipe.stages.finetune import finetune_module
from kdpipe.stages.train import TRAINING_SECTIONS

log = logging.getLogger("kdpipe")


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


def prune_compute(run: StageRun, upstream: StageOutput, teacher: StageOutput | None) -> Product:
    ctx = run.ctx
    pcfg, sched, ft = ctx.cfg.prune, ctx.cfg.prune.schedule, ctx.cfg.prune.finetune
    model = load_model(upstream.path)
    arch = read_model_file(upstream.path)["arch"]
    method, target = str(pcfg.method), float(pcfg.sparsity)
    params_before, _ = count_params(model)

    fits = iter(range(10**6))

    def finetune(epochs: int, callbacks=()) -> None:
        if epochs > 0:
            module = finetune_module(ctx, model, teacher, bool(ft.distill), float(ft.lr_scale))
            run.fitter.fit(module, f"finetune{next(fits)}", epochs, callbacks, resumable=False)

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


def run_prune(ctx: PipelineContext, upstream: StageOutput, teacher: StageOutput | None) -> StageOutput:
    """Prune the model of `upstream` (fine-tuning distils from `teacher` when configured)."""
    return run_stage(ctx, "prune", ["prune", "distill", *TRAINING_SECTIONS], [upstream],
                     lambda run: prune_compute(run, upstream, teacher))

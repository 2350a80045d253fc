"""The prune stage: a pruner stepped on a schedule by one callback, in one fine-tuning fit; every
number logged here is measured on the saved artefact."""

from __future__ import annotations

import mlflow

from kdpipe.compress import prune_model
from kdpipe.compress.budget import log_sensitivity, prune_sensitivity
from kdpipe.compress.save import save_pruned
from kdpipe.errors import build
from kdpipe.metrics.measure import torch_logits
from kdpipe.models.io import load_model, read_model_file
from kdpipe.modules import DistillationModule
from kdpipe.stages.base import PipelineContext, Product, StageOutput, StageRun, run_stage
from kdpipe.stages.finetune import finetune_module
from kdpipe.stages.train import TRAINING_SECTIONS


def prune_compute(run: StageRun, upstream: StageOutput, teacher: StageOutput | None) -> Product:
    ctx = run.ctx
    pcfg, ft = ctx.cfg.prune, ctx.cfg.prune.finetune
    model = load_model(upstream.path)
    if ctx.cfg.compress.sensitivity:
        val = ctx.datamodule.val_dataloader()

        def val_acc(m) -> float:
            logits, target = torch_logits(m, val)
            return float((logits.argmax(-1) == target).float().mean())

        log_sensitivity(prune_sensitivity(model, pcfg.pruner, ctx.example_input, val_acc,
                                          list(ctx.cfg.compress.sensitivity_sparsities),
                                          ctx.datamodule.train_dataloader()), "prune")
    pruner = build(pcfg.pruner, "prune.pruner", model=model, example_inputs=ctx.example_input)
    schedule = build(pcfg.schedule, "prune.schedule")

    source = upstream if str(ft.get("distill_from", "teacher")) == "input" else teacher

    def finetune(callbacks, epochs: int) -> None:
        module = finetune_module(ctx, model, source, bool(ft.distill), float(ft.lr_scale))
        origin = str(ft.get("distill_from", "teacher"))
        mlflow.set_tag("kdpipe.finetune_from", origin if isinstance(module, DistillationModule) else "labels")
        run.fitter.fit(module, "finetune", epochs, callbacks, resumable=False)

    metrics = prune_model(pruner, schedule, finetune)
    files = save_pruned(model, read_model_file(upstream.path)["arch"], ctx.workdir / "prune",
                        pruner.structural, str(pcfg.get("storage", "dense")), ctx.example_input)
    if files.plain is not None:
        mlflow.log_artifact(str(files.plain), artifact_path="model_plain")
    mlflow.set_tag("kdpipe.prune_method", str(pcfg.method))
    return Product(files.model, metrics=metrics, artifacts=[files.table])


def run_prune(ctx: PipelineContext, upstream: StageOutput, teacher: StageOutput | None) -> StageOutput:
    """Prune the model of `upstream`; fine-tuning distils from `teacher`, or from the uncompressed
    `upstream` itself (`prune.finetune.distill_from=input`), when configured."""
    return run_stage(ctx, "prune", ["prune", "compress", "distill", *TRAINING_SECTIONS], [upstream],
                     lambda run: prune_compute(run, upstream, teacher))

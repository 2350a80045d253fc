"""The prune stage: the pruner and schedule of `conf/prune/` run by `kdpipe.compress.prune_model`
in one fine-tuning fit; every number logged here is measured on the saved artefact."""

from __future__ import annotations

import mlflow

from kdpipe.compress import prune_model
from kdpipe.compress.checks import build
from kdpipe.compress.save import save_pruned
from kdpipe.models.io import load_model, read_model_file
from kdpipe.stages.base import PipelineContext, Product, StageOutput, run_stage
from kdpipe.stages.finetune import finetune_module
from kdpipe.stages.train import fit


def prune_compute(ctx: PipelineContext, run_id: str) -> Product:
    pcfg, ft = ctx.cfg.prune, ctx.cfg.prune.finetune
    upstream = ctx.outputs["last"]
    model = load_model(upstream.path)
    pruner = build(pcfg.pruner, "prune.pruner", model=model, example_inputs=ctx.example_input)
    schedule = build(pcfg.schedule, "prune.schedule")

    def finetune(callbacks, epochs: int) -> None:
        module = finetune_module(ctx, model, bool(ft.distill), float(ft.lr_scale))
        fit(ctx, "prune", run_id, module, epochs, callbacks)

    metrics = prune_model(pruner, schedule, finetune)
    files = save_pruned(model, read_model_file(upstream.path)["arch"], ctx.workdir / "prune", pruner.structural,
                        str(pcfg.get("storage", "dense")), ctx.example_input)
    if files.plain is not None:
        mlflow.log_artifact(str(files.plain), artifact_path="model_plain")
    mlflow.set_tag("kdpipe.prune_method", str(pcfg.method))
    return Product(files.model, metrics=metrics, artifacts=[files.table])


def run_prune(ctx: PipelineContext) -> StageOutput:
    return run_stage(ctx, "prune", ["prune", "distill", "trainer", "optim"], [ctx.outputs["last"]], prune_compute)

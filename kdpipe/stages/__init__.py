"""Pipeline stages: teacher -> distill -> prune -> quantize -> evaluate.

Each stage is a function `compute(ctx, upstream) -> Product` run inside `run_stage`, which
adds what every stage shares: the cache key, the lock, reuse, the MLflow child run, the
artefact upload.
"""

from kdpipe.stages.base import PipelineContext, Product, StageOutput, run_stage

__all__ = ["PipelineContext", "Product", "StageOutput", "run_stage"]

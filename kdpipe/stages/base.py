"""What every stage shares."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

import kdpipe
from kdpipe.data.base import TensorDataModule
from kdpipe.faults import checkpoint_dir, clear_checkpoints, interrupted_runs, owner_tags
from kdpipe.tracking.naming import SWEEP_TAG
from kdpipe.tracking.store import (
    ARTIFACT_TAG,
    CACHE_KEY_TAG,
    REUSED_FROM_TAG,
    RUN_TYPE_TAG,
    STAGE_TAG,
    cache_key,
    find_reusable_run,
    stage_lock,
)

log = logging.getLogger("kdpipe")

# Trainer keys that change how a run looks, not what it computes: left out of cache keys.
COSMETIC_TRAINER_KEYS = {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"}


@dataclass
class Product:
    """What a stage's compute returns: a model file and its kind (`torch` or `onnx`)."""

    path: Path
    kind: str = "torch"
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


@dataclass
class StageOutput:
    """A finished stage of this pipeline: its run, its cache key and its model on disk."""

    stage: str
    run_id: str
    cache_key: str
    path: Path | None
    kind: str = "torch"
    source: StageOutput | None = None  # for an ONNX model: the torch model it was made from
    reused_from: str | None = None


@dataclass
class PipelineContext:
    cfg: DictConfig
    datamodule: TensorDataModule
    workdir: Path
    tracking_uri: str
    outputs: dict[str, StageOutput] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # stage -> cache key of the stage running now
    interrupted: dict[str, list] = field(default_factory=dict)  # stage -> runs of killed jobs, newest first
    fits: dict[str, int] = field(default_factory=dict)  # stage -> Lightning fits started so far

    def fit_key(self, stage: str) -> str | None:
        """The checkpoint key of the next fit of `stage`. A stage may fit several models in turn
        (ensemble members, assistant chains, generations): each gets its own folder, in the same
        order on a re-run, so a resumed stage never loads one model's checkpoint into another."""
        part = self.fits.get(stage, 0)
        self.fits[stage] = part + 1
        key = self.keys.get(stage)
        return None if key is None else (key if part == 0 else f"{key}/fit{part}")

    def checkpoint_root(self) -> str:
        return str(self.cfg.get("checkpoint_dir") or ".kdpipe/checkpoints")

    def section(self, name: str) -> Any:
        node = self.cfg.get(name)
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node

    def trainer(self, stage: str, run_id: str, max_epochs: int, callbacks: Sequence[Callback] = (),
                ckpt_key: str | None = None) -> pl.Trainer:
        """A Lightning Trainer whose per-epoch curves go to the stage's MLflow run."""
        kwargs = dict(self.section("trainer"))
        kwargs["max_epochs"] = int(max_epochs)
        logger = MLFlowLogger(tracking_uri=self.tracking_uri, run_id=run_id)
        # keyed by the stage's cache key, so the same command run again finds it and resumes
        ckpt_key = ckpt_key or self.fit_key(stage)
        ckpt_dir = checkpoint_dir(self.checkpoint_root(), ckpt_key) if ckpt_key \
            else self.workdir / "checkpoints" / stage
        ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1)  # top 1 = the newest epoch
        return pl.Trainer(**kwargs, logger=logger, callbacks=[ckpt, *callbacks],
                          default_root_dir=str(self.workdir))

    @property
    def example_input(self):
        return self.datamodule.example_input(2)

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes


def stage_key(ctx: PipelineContext, stage: str, sections: Sequence[str], upstream: Sequence[StageOutput],
              extra: Any = None) -> str:
    """Hash of (code version, stage, its config sections, data config, seed, upstream keys)."""
    parts = {}
    for name in sections:
        value = ctx.section(name)
        if name == "trainer" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in COSMETIC_TRAINER_KEYS}
        parts[name] = value
    return cache_key(kdpipe.__version__, stage, parts, ctx.section("data"), ctx.cfg.seed,
                     [u.cache_key for u in upstream], extra)


def run_stage(ctx: PipelineContext, stage: str, sections: Sequence[str], upstream: Sequence[StageOutput],
              compute: Callable[[PipelineContext, str], Product | None], extra_key: Any = None,
              reusable: bool = True) -> StageOutput:
    """Run one stage as a nested MLflow run; reuse a finished run with the same key if any."""
    key = stage_key(ctx, stage, sections, upstream, extra_key)
    tags = {STAGE_TAG: stage, CACHE_KEY_TAG: key, RUN_TYPE_TAG: "stage", **owner_tags()}
    parent = mlflow.active_run()
    if parent is not None and SWEEP_TAG in parent.data.tags:  # a sweep filter finds stage runs too
        tags[SWEEP_TAG] = parent.data.tags[SWEEP_TAG]
    with stage_lock(key):
        ctx.keys[stage], ctx.interrupted[stage] = key, interrupted_runs(key)
        found = find_reusable_run(key) if (reusable and ctx.cfg.reuse) else None
        with mlflow.start_run(run_name=stage, nested=True, tags=tags) as run:
            run_id = run.info.run_id
            if found is not None:
                try:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=found.info.run_id, artifact_path=found.data.tags[ARTIFACT_TAG],
                        dst_path=str(ctx.workdir / stage))
                except Exception as exc:  # artefact deleted from the store: recompute
                    log.warning("stage %s: cannot fetch cached artefact of run %s (%s); recomputing",
                                stage, found.info.run_id, exc)
                else:
                    mlflow.set_tag(REUSED_FROM_TAG, found.info.run_id)
                    log.info("stage %s: reused run %s (cache key %s)", stage, found.info.run_id, key)
                    kind = found.data.tags.get("kdpipe.model_kind", "torch")
                    return StageOutput(stage, run_id, key, Path(local), kind=kind, reused_from=found.info.run_id)
            pl.seed_everything(int(ctx.cfg.seed), verbose=False)
            product = compute(ctx, run_id)
            if product is None:  # a stage that measures rather than produces a model
                return StageOutput(stage, run_id, key, None, kind="none")
            if product.metrics:
                mlflow.log_metrics(product.metrics)
            for extra in product.artifacts:
                mlflow.log_artifact(str(extra), artifact_path="tables")
            mlflow.log_artifact(str(product.path), artifact_path="model")
            mlflow.set_tag("kdpipe.model_kind", product.kind)
            mlflow.set_tag(ARTIFACT_TAG, f"model/{product.path.name}")
            clear_checkpoints(ctx.checkpoint_root(), key)
            return StageOutput(stage, run_id, key, product.path, kind=product.kind)

"""What every stage shares."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

import kdpipe
from kdpipe.data.augment import build_augmentation
from kdpipe.data.base import TensorDataModule
from kdpipe.faults import clear_checkpoints, fault_point, interrupted_runs, owner_tags
from kdpipe.tracking.naming import SWEEP_TAG
from kdpipe.tracking.store import (
    ARTIFACT_SHA256_TAG,
    ARTIFACT_TAG,
    CACHE_KEY_TAG,
    REUSED_FROM_TAG,
    RUN_TYPE_TAG,
    STAGE_TAG,
    cache_key,
    fetch_verified_artifact,
    file_sha256,
    find_reusable_run,
    stage_lock,
)
from kdpipe.training import Fitter, Optim

log = logging.getLogger("kdpipe")

# Keys that change how a run looks or what it says, or only name what the key holds otherwise: left
# out of cache keys.
MESSAGE_ONLY_KEYS = {
    "trainer": {"enable_progress_bar", "enable_model_summary", "log_every_n_steps"},
    "prune": {"one_shot_warn_above"},  # the threshold of a warning
    "data": {"num_workers"},  # the same seeded batches, loaded by more processes
    "teacher": {"checkpoint"},  # the file's reference: run_teacher keys on the file's content instead
}


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
    """What every stage of one pipeline reads: the config, the data, the run folder and the store.
    Stages write nothing here; each returns its `StageOutput` and the pipeline hands it on."""

    cfg: DictConfig
    datamodule: TensorDataModule
    workdir: Path
    tracking_uri: str
    teacher_file: Path | None = None  # `teacher.checkpoint` fetched to a local file

    @property
    def checkpoint_root(self) -> str:
        return str(self.cfg.get("checkpoint_dir") or ".kdpipe/checkpoints")

    def section(self, name: str) -> Any:
        node = self.cfg.get(name)
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node

    def optim(self, lr_scale: float = 1.0) -> Optim:
        """The optimiser (and LR scheduler) of `conf/optim/`, at `lr_scale` times its learning rate."""
        return Optim.from_config(self.cfg.optim).scaled(float(lr_scale))

    @functools.cached_property
    def augment(self):
        """The batch augmentation of `data.augment` (None without one)."""
        return build_augmentation(self.section("data").get("augment"), self.datamodule.in_shape,
                                  self.datamodule.num_classes)

    @property
    def example_input(self):
        return self.datamodule.example_input(2)

    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes


@dataclass
class StageRun:
    """A stage being computed: its cache key, its MLflow run, and the `Fitter` of its fits."""

    ctx: PipelineContext
    stage: str
    key: str
    run_id: str
    fitter: Fitter


def computed_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """The Trainer settings as Lightning resolves them on this machine, so that spellings which
    compute the same (`accelerator=auto` on a CPU-only machine and `accelerator=cpu`, precision
    `32` and `"32-true"`) give one cache key."""
    import torch

    out = dict(trainer)
    accelerator = str(out.get("accelerator", "auto")).lower()
    if accelerator in ("auto", "gpu"):
        if torch.cuda.is_available():
            accelerator = "cuda"
        elif accelerator == "auto":
            mps = getattr(torch.backends, "mps", None)
            accelerator = "mps" if mps is not None and mps.is_available() else "cpu"
    out["accelerator"] = accelerator
    if accelerator == "cpu" and str(out.get("devices", "auto")) in ("auto", "1", "-1"):
        out["devices"] = 1
    if str(out.get("strategy", "auto")) == "auto":
        out.pop("strategy", None)
    if "precision" in out:
        from lightning_fabric.connector import _convert_precision_to_unified_args

        try:
            out["precision"] = _convert_precision_to_unified_args(out["precision"])
        except Exception:  # Lightning refuses it when the Trainer is built, with its own message
            pass
    return out


def _user_code(value: Any, found: set[str]) -> set[str]:
    """The `_target_` import paths outside kdpipe under a config section."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "_target_" and isinstance(v, str) and not v.startswith("kdpipe."):
                found.add(v)
            else:
                _user_code(v, found)
    elif isinstance(value, list):
        for v in value:
            _user_code(v, found)
    return found


def _source_hash(target: str) -> str | None:
    """A hash of the source file that defines `target` (a user's loss term, model or callback), so
    that editing it recomputes the stages that use it; None for a compiled or built-in module."""
    module = target
    while module:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            origin = spec.origin or ""
            if origin.endswith(".py") and Path(origin).is_file() and "site-packages" not in origin:
                return hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]
            return None
        module = module.rpartition(".")[0]
    return None


def stage_key(ctx: PipelineContext, stage: str, sections: Sequence[str], upstream: Sequence[StageOutput],
              extra: Any = None, seeded: bool = True) -> str:
    """Hash of what the stage computes: kdpipe's code (and the source of any user `_target_` it
    uses), the stage's config sections as they resolve here (without `MESSAGE_ONLY_KEYS`), the
    data as loaded (its fingerprint, not just its config), the seed (unless the stage's product
    does not depend on it: `seeded=False`), and the upstream keys."""
    parts = {}
    for name in [*sections, "data"]:
        value = ctx.section(name)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in MESSAGE_ONLY_KEYS.get(name, ())}
            if name == "trainer":
                value = computed_trainer(value)
        parts[name] = value
    user_code = {t: _source_hash(t) for t in sorted(_user_code(parts, set()))}
    data = getattr(ctx.datamodule, "fingerprint", None)
    return cache_key(kdpipe.code_version(), user_code, stage, parts, data, ctx.cfg.seed if seeded else None,
                     [u.cache_key for u in upstream], extra)


def run_stage(ctx: PipelineContext, stage: str, sections: Sequence[str], upstream: Sequence[StageOutput],
              compute: Callable[[StageRun], Product | None], extra_key: Any = None,
              reusable: bool = True, seeded: bool = True) -> StageOutput:
    """Run one stage as a nested MLflow run; reuse a finished run with the same key if any."""
    key = stage_key(ctx, stage, sections, upstream, extra_key, seeded)
    tags = {STAGE_TAG: stage, CACHE_KEY_TAG: key, RUN_TYPE_TAG: "stage", **owner_tags()}
    parent = mlflow.active_run()
    if parent is not None and SWEEP_TAG in parent.data.tags:  # a sweep filter finds stage runs too
        tags[SWEEP_TAG] = parent.data.tags[SWEEP_TAG]
    with stage_lock(key):
        interrupted = interrupted_runs(key)
        found = find_reusable_run(key) if (reusable and ctx.cfg.reuse) else None
        with mlflow.start_run(run_name=stage, nested=True, tags=tags) as run:
            run_id = run.info.run_id
            fault_point(f"stage-{stage}")
            if found is not None:
                try:
                    local = fetch_verified_artifact(found, ctx.workdir / stage)
                except Exception as exc:  # artefact deleted from the store or damaged: recompute
                    log.warning("stage %s: cannot reuse the artefact of run %s (%s); recomputing",
                                stage, found.info.run_id, exc)
                else:
                    mlflow.set_tag(REUSED_FROM_TAG, found.info.run_id)
                    log.info("stage %s: reused run %s (cache key %s)", stage, found.info.run_id, key)
                    kind = found.data.tags.get("kdpipe.model_kind", "torch")
                    return StageOutput(stage, run_id, key, Path(local), kind=kind,
                                       reused_from=found.info.run_id)
            pl.seed_everything(int(ctx.cfg.seed), verbose=False)
            fitter = Fitter(stage, key, run_id, ctx.tracking_uri, ctx.datamodule, ctx.workdir,
                            trainer_kwargs=ctx.section("trainer"), checkpoint_root=ctx.checkpoint_root,
                            callbacks=ctx.section("callbacks") or {}, resume=bool(ctx.cfg.reuse),
                            interrupted=interrupted)
            product = compute(StageRun(ctx, stage, key, run_id, fitter))
            if product is None:  # a stage that measures rather than produces a model
                return StageOutput(stage, run_id, key, None, kind="none")
            if product.metrics:
                mlflow.log_metrics(product.metrics)
            for extra in product.artifacts:
                mlflow.log_artifact(str(extra), artifact_path="tables")
            mlflow.log_artifact(str(product.path), artifact_path="model")
            mlflow.set_tags({"kdpipe.model_kind": product.kind,
                             ARTIFACT_SHA256_TAG: file_sha256(product.path)})
            mlflow.set_tag(ARTIFACT_TAG, f"model/{product.path.name}")  # last: the stage is reusable now
            clear_checkpoints(ctx.checkpoint_root, key)
            return StageOutput(stage, run_id, key, product.path, kind=product.kind)

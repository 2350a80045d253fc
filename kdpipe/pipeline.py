"""One pipeline run (one Hydra job): teacher -> distill -> prune -> quantize -> evaluate,
as an MLflow parent run with one nested run per stage."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import onnx
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdpipe.export import export_onnx
from kdpipe.faults import fault_point, owner_tags, reap_orphans, stop_if_terminated
from kdpipe.models.io import load_model
from kdpipe.report.plots import accuracy_vs_size
from kdpipe.report.summary import print_summary
from kdpipe.stages.base import PipelineContext, StageOutput
from kdpipe.stages.evaluate import exits_folder, run_evaluate, write_tables
from kdpipe.stages.prune import run_prune
from kdpipe.stages.quantize import run_quantize
from kdpipe.stages.train import fetch_teacher_checkpoint, run_distill, run_teacher
from kdpipe.tracking.naming import SWEEP_TAG, run_name, sweep_id
from kdpipe.tracking.store import RUN_TYPE_TAG, flatten, log_flat_params, setup_tracking

log = logging.getLogger("kdpipe")

PIP_REQUIREMENTS = ["torch", "kdpipe"]


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def compression_metrics(rows: list[dict]) -> dict[str, float]:
    """Teacher against the shipped (last) model: size ratio, accuracy drop in points, speed-up."""
    by_stage = {r["stage"]: r for r in rows}
    first, final = by_stage.get("teacher", rows[0]), rows[-1]
    return {
        "compression/ratio": first["model/size_bytes"] / final["model/size_bytes"],
        "compression/acc_drop": 100.0 * (first["test/acc"] - final["test/acc"]),
        "compression/speedup": first["latency/p50_ms"] / final["latency/p50_ms"],
    }


def log_final_model(final: StageOutput, example: np.ndarray) -> None:
    """Log the shipped model as `model`: the int8 ONNX model when the pipeline quantized (its
    fp32 torch source beside it as `model_fp32`), else the torch model. Load it back with
    `mlflow.pytorch.load_model` / `mlflow.onnx.load_model`."""
    if final.kind == "onnx":
        mlflow.onnx.log_model(onnx.load(str(final.path)), name="model", input_example=example,
                              pip_requirements=["onnxruntime", "onnx"],
                              onnx_execution_providers=["CPUExecutionProvider"])
        mlflow.pytorch.log_model(load_model(final.source.path), name="model_fp32", input_example=example,
                                 pip_requirements=PIP_REQUIREMENTS)
    else:
        mlflow.pytorch.log_model(load_model(final.path), name="model", input_example=example,
                                 pip_requirements=PIP_REQUIREMENTS)


def _run_identity(cfg: DictConfig) -> tuple[str, dict[str, str]]:
    """The pipeline run's name (`cfg.run_name`, else built from the config and the overridden
    keys) and its tags (`kdpipe.sweep` in a multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    overrides, multirun, sweep_dir = [], False, None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides, multirun, sweep_dir = list(hc.overrides.task), hc.mode == RunMode.MULTIRUN, hc.sweep.dir
    tags = {RUN_TYPE_TAG: "pipeline"}
    sweep = sweep_id(multirun, sweep_dir)
    if sweep:
        tags[SWEEP_TAG] = sweep
    return cfg.get("run_name") or run_name(cfg, overrides), tags


def run_pipeline(cfg: DictConfig, workdir: Path) -> dict[str, float]:
    """Run every stage that is not `none`; return the parent run's metrics."""
    # Everything that can be wrong with the input is found before the first run is created: the
    # data (loaded and checked), then the store, then a teacher checkpoint held in the store.
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    uri = cfg.tracking.uri or mlflow.get_tracking_uri()
    teacher_file = None
    if cfg.get("teacher") is not None and cfg.teacher.get("checkpoint"):
        teacher_file = fetch_teacher_checkpoint(str(cfg.teacher.checkpoint), uri)
    setup_tracking(uri, cfg.tracking.experiment, cfg.tracking.get("artifact_location"))
    reap_orphans()  # runs a killed job left RUNNING, in any stage or after the last one
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PipelineContext(cfg, datamodule, workdir, mlflow.get_tracking_uri(), teacher_file)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name, tags = _run_identity(cfg)
    with mlflow.start_run(run_name=name, tags={**tags, **owner_tags()}) as parent:
        log_flat_params(parent.info.run_id, flatten(resolved))
        cfg_file = workdir / "config.yaml"
        cfg_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        mlflow.log_artifact(str(cfg_file))

        teacher = run_teacher(ctx) if cfg.get("teacher") is not None else None
        models = [o for o in [teacher, run_distill(ctx, teacher)] if o is not None]
        if cfg.prune.get("method", "none") != "none":
            models.append(run_prune(ctx, models[-1], teacher))
        if cfg.quantize.get("mode", "none") != "none":
            models.append(run_quantize(ctx, models[-1], teacher))
        rows = run_evaluate(ctx, models)
        shipped = models[-1]

        final = rows[-1]
        parent_metrics = {k: v for k, v in final.items() if isinstance(v, float)}
        parent_metrics.update(compression_metrics(rows))
        mlflow.log_metrics(parent_metrics)
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_tables(rows, Path(tmp)):
                mlflow.log_artifact(str(path), artifact_path="tables")
            mlflow.log_artifact(str(accuracy_vs_size(rows, Path(tmp) / "accuracy_vs_size.png")),
                                artifact_path="plots")
            if cfg.get("export", {}).get("onnx") and shipped.kind == "torch":
                onnx_path = export_onnx(load_model(shipped.path), ctx.example_input, Path(tmp) / "model.onnx")
                mlflow.log_artifact(str(onnx_path), artifact_path="model_onnx")
        example = datamodule.example_input(1).numpy()
        fault_point("log-model")
        log_final_model(shipped, example)
        package = exits_folder(ctx, shipped)
        if package.is_dir():  # the early-exit model as it ships: kdpipe.exits.ExitRuntime.load(folder)
            for f in sorted(package.glob("segment_*.onnx")) + [package / "policy.json"]:
                mlflow.log_artifact(str(f), artifact_path="model_exits")
        mlflow.set_tag("kdpipe.final_stage", final["stage"])
        stop_if_terminated()  # a SIGTERM during the final logging still ends the job 143
    print_summary(rows, parent_metrics, ui_command(ctx.tracking_uri))
    return parent_metrics

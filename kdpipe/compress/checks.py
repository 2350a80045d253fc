"""Config checks for `prune=` and `quantize=`, run before any training (kdpipe.config.validate)."""

from __future__ import annotations

import warnings

from omegaconf import DictConfig

from kdpipe.compress.quantize import CALIBRATION_METHODS, CompressionWarning
from kdpipe.compress.schedules import SCHEDULES
from kdpipe.compress.structured import IMPORTANCE
from kdpipe.errors import ConfigError


def check_prune(prune: DictConfig) -> None:
    method = str(prune.get("method", "none"))
    if method == "none":
        return
    if method not in ("magnitude", "structured"):
        raise ConfigError(f"prune.method={method} is not known; use prune=magnitude, prune=structured or prune=none")
    if prune.get("scope", "global") not in ("global", "layer"):
        raise ConfigError(f"prune.scope={prune.scope} must be global (rank all layers together) or layer")
    sched = prune.get("schedule") or {}
    name = str(sched.get("name", "one_shot"))
    if name not in SCHEDULES:
        raise ConfigError(f"prune.schedule.name={name} is not known; use one of {', '.join(SCHEDULES)}")
    if name == "iterative" and int(sched.get("steps", 1)) < 1:
        raise ConfigError(f"prune.schedule.steps={sched.steps} must be >= 1 (e.g. 5)")
    if name == "agp":
        if method == "structured":
            raise ConfigError("prune.schedule.name=agp prunes masks during training and works with "
                              "prune=magnitude; for structured pruning use prune.schedule.name=iterative")
        if not 0.0 <= float(sched.initial_sparsity) <= float(prune.sparsity):
            raise ConfigError(f"prune.schedule.initial_sparsity={sched.initial_sparsity} must lie in "
                              f"[0, prune.sparsity={prune.sparsity}]")
        if float(sched.end_epoch) <= float(sched.start_epoch) or float(sched.end_epoch) > int(prune.finetune.epochs):
            raise ConfigError(f"prune.schedule: agp needs start_epoch < end_epoch <= prune.finetune.epochs "
                              f"(got {sched.start_epoch}, {sched.end_epoch}, {prune.finetune.epochs})")
    if method == "structured" and str(prune.get("importance", "magnitude")) not in IMPORTANCE:
        raise ConfigError(f"prune.importance={prune.importance} is not known; use one of {', '.join(IMPORTANCE)}")
    limit = float(prune.get("one_shot_warn_above", 0.5))
    if name == "one_shot" and float(prune.sparsity) > limit:
        warnings.warn(
            f"a one-shot cut of prune.sparsity={prune.sparsity} (> {limit}) often loses accuracy that "
            f"fine-tuning does not recover; consider prune.schedule.name=iterative (e.g. prune=iterative) "
            f"or prune.schedule.name=agp", CompressionWarning, stacklevel=2)


def check_quantize(quantize: DictConfig) -> None:
    mode = str(quantize.get("mode", "none"))
    if mode in ("none", "dynamic"):
        return
    if mode not in ("static", "qat"):
        raise ConfigError(f"quantize.mode={mode} is not known; use quantize=dynamic, static, qat or none")
    cal = quantize.calibration
    if int(cal.num_batches) < 1:
        raise ConfigError(f"quantize.calibration.num_batches={cal.num_batches}: {mode} quantization needs "
                          f"calibration data to set activation ranges; give at least 1 batch (e.g. 8)")
    if str(cal.method) not in CALIBRATION_METHODS:
        raise ConfigError(f"quantize.calibration.method={cal.method} is not known; use one of "
                          f"{', '.join(CALIBRATION_METHODS)}")
    if mode == "qat" and int(quantize.epochs) < 1:
        raise ConfigError(f"quantize.epochs={quantize.epochs}: QAT needs at least 1 epoch of fake-quant "
                          f"training; use quantize=static for no training")


def check_compression(cfg: DictConfig) -> None:
    check_prune(cfg.prune)
    check_quantize(cfg.quantize)

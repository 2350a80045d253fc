"""Config checks for `prune=` and `quantize=`, run before any training (kdpipe.config.validate); the
numeric ranges (sparsity, steps, agp bounds, calibration batches, QAT epochs) are in kdpipe.limits."""

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
    if name == "agp" and method == "structured":
        raise ConfigError("prune.schedule.name=agp prunes masks during training and works with "
                          "prune=magnitude; for structured pruning use prune.schedule.name=iterative")
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
    if str(cal.method) not in CALIBRATION_METHODS:
        raise ConfigError(f"quantize.calibration.method={cal.method} is not known; use one of "
                          f"{', '.join(CALIBRATION_METHODS)}")


def check_compression(cfg: DictConfig) -> None:
    check_prune(cfg.prune)
    check_quantize(cfg.quantize)

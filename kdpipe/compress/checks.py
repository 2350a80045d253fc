"""Config checks for `prune=` and `quantize=`, run before any training (kdpipe.config.validate)."""

from __future__ import annotations

import warnings

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from torch import nn

from kdpipe import limits
from kdpipe.compress.lowbit import FORMATS as LOWBIT_FORMATS
from kdpipe.compress.quantize import CALIBRATION_METHODS, CompressionWarning
from kdpipe.compress.save import STORAGES
from kdpipe.data.base import config_example
from kdpipe.errors import ConfigError, build

# Optimizer steps an epoch when asking a schedule how many cuts it makes: the most it could make.
_FINE_GRAINED = 10_000


def _processes(trainer: DictConfig | None) -> int:
    """Training processes a trainer config asks for (1 when it cannot say: devices=auto)."""
    if trainer is None:
        return 1
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, ListConfig)):
        n = len(devices)
    else:
        n = int(devices) if str(devices).isdigit() else 1
    return n * int(trainer.get("num_nodes", 1) or 1)


def check_distill_from(value: str, key: str) -> None:
    if str(value) not in ("teacher", "input"):
        raise ConfigError(f"{key}={value} is not known; fine-tuning distils from teacher or from input "
                          f"(the uncompressed model entering the stage)")


def check_prune(prune: DictConfig, trainer: DictConfig | None = None, model: nn.Module | None = None,
                example: torch.Tensor | None = None) -> None:
    """Build the schedule (its range checks run) and the pruner, on `model` when given (a fresh
    student: `ignore` paths and the scope are checked too); refuse what cannot run, warn on a big
    one-shot cut."""
    if prune.get("pruner") is None:  # prune=none
        return
    sparsity = limits.sparsity(prune.sparsity)
    if prune.get("storage", "dense") not in STORAGES:
        raise ConfigError(f"prune.storage={prune.storage} must be sparse (bitmask + non-zero values) "
                          "or dense")
    finetune = prune.get("finetune") or {}
    check_distill_from(finetune.get("distill_from", "teacher"), "prune.finetune.distill_from")
    schedule = build(prune.schedule, "prune.schedule")
    if model is not None:
        pruner = build(prune.pruner, "prune.pruner", model=model, example_inputs=example)
    else:  # the class and its importance are imported and built all the same
        pruner = build(prune.pruner, "prune.pruner", _partial_=True).func
    if getattr(pruner, "structural", False) and _processes(trainer) > 1:
        raise ConfigError(f"{prune.pruner._target_} removes channels during the fine-tuning fit, which a "
                          f"distributed run cannot follow; prune on one device (trainer.devices=1) or use "
                          f"prune=magnitude")
    limit = float(prune.get("one_shot_warn_above", 0.5))
    if len(schedule.points(_FINE_GRAINED)) == 1 and sparsity > limit:
        warnings.warn(
            f"a one-shot cut of prune.sparsity={prune.sparsity} (> {limit}) often loses accuracy that "
            f"fine-tuning does not recover; consider prune/schedule=iterative (e.g. prune=iterative) "
            f"or prune/schedule=agp", CompressionWarning, stacklevel=2)


def check_lowbit(quantize: DictConfig) -> None:
    mode = str(quantize.mode)
    if mode == "kmeans" and not 1 <= int(quantize.bits) <= 8:
        raise ConfigError(f"quantize.bits={quantize.bits}: k-means weight sharing takes 1 to 8 bits "
                          f"(2 to 256 shared values a layer)")
    if mode == "int4" and int(quantize.group_size) < 1:
        raise ConfigError(f"quantize.group_size={quantize.group_size}: int4 needs groups of at least 1 "
                          f"weight (e.g. 32)")
    if int(quantize.epochs) < 0:
        raise ConfigError(f"quantize.epochs={quantize.epochs} must be >= 0")
    check_distill_from(quantize.get("distill_from", "teacher"), "quantize.distill_from")
    if mode == "binary" and int(quantize.epochs) == 0:
        warnings.warn("quantize=binary with quantize.epochs=0: binary weights without training lose most of "
                      "the accuracy; give a few epochs (e.g. 3)", CompressionWarning, stacklevel=2)


def check_quantize(quantize: DictConfig) -> None:
    mode = str(quantize.get("mode", "none"))
    if mode in ("none", "dynamic"):
        return
    if mode in LOWBIT_FORMATS:
        check_lowbit(quantize)
        return
    if mode not in ("static", "qat"):
        raise ConfigError(f"quantize.mode={mode} is not known; use quantize=dynamic, static, qat, int4, "
                          f"binary, kmeans or none")
    cal = quantize.calibration
    if int(cal.num_batches) < 1:
        raise ConfigError(f"quantize.calibration.num_batches={cal.num_batches}: {mode} quantization needs "
                          f"calibration data to set activation ranges; give at least 1 batch (e.g. 8)")
    if str(cal.method) not in CALIBRATION_METHODS:
        raise ConfigError(f"quantize.calibration.method={cal.method} is not known; use one of "
                          f"{', '.join(CALIBRATION_METHODS)}")
    if str(cal.get("source", "train")) not in ("train", "synthetic"):
        raise ConfigError(f"quantize.calibration.source={cal.source} is not known; use train (the training "
                          f"split) or synthetic (inputs synthesised from the model, no data)")
    if mode == "qat":
        check_distill_from(quantize.get("distill_from", "teacher"), "quantize.distill_from")
    if mode == "qat" and int(quantize.epochs) < 1:
        raise ConfigError(f"quantize.epochs={quantize.epochs}: QAT needs at least 1 epoch of fake-quant "
                          f"training; use quantize=static for no training")


def _student(cfg: DictConfig) -> tuple[nn.Module | None, torch.Tensor | None]:
    """A fresh student and an example batch, to build the pruner on (None when the student
    cannot be built: kdpipe.config.validate says why)."""
    try:
        model = instantiate(cfg.student.model)
        return model, config_example(cfg.get("data"))[1]
    except Exception:
        return None, None


REFERENCES = ("input", "teacher")


def check_budget(cfg: DictConfig) -> None:
    """`compress.*`: a budget is a number of points >= 0, measured against a model this pipeline has,
    on a stage that runs (the quantize stage keeps its most sensitive layers fp32)."""
    ccfg = cfg.get("compress")
    if ccfg is None:
        return
    budget, reference = ccfg.get("max_acc_drop"), str(ccfg.get("reference", "input"))
    if budget is not None:
        try:
            ok = float(budget) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"compress.max_acc_drop={budget}: give the points of validation accuracy "
                              f"compression may cost, a number >= 0 (e.g. 1.0), or null for no budget")
    if reference not in REFERENCES:
        raise ConfigError(f"compress.reference={reference} is not known; use input (the model entering the "
                          f"stage) or teacher")
    if budget is not None and reference == "teacher" and cfg.get("teacher") is None:
        raise ConfigError("compress.reference=teacher, but this pipeline has no teacher; use "
                          "compress.reference=input")
    mode = str(cfg.quantize.get("mode", "none"))
    int8 = mode in ("static", "dynamic", "qat")
    pruning = cfg.prune.get("method", "none") != "none"
    if budget is not None and not int8 and not pruning:
        raise ConfigError(f"compress.max_acc_drop acts on the prune stage and on int8 in the quantize stage, "
                          f"and this pipeline has neither (prune=none, quantize={mode})")
    allocation = str(ccfg.get("allocation", "uniform"))
    if allocation not in ("uniform", "sensitivity"):
        raise ConfigError(f"compress.allocation={allocation} is not known; use uniform (every layer the same "
                          f"share) or sensitivity (each layer by the latency it saves per point it costs)")
    pruner_target = str(cfg.prune.get("pruner", {}).get("_target_"))
    if allocation == "sensitivity" and "StructuredPruner" not in pruner_target:
        raise ConfigError(f"compress.allocation=sensitivity plans channel widths per layer, which needs "
                          f"prune=structured (got prune={cfg.prune.get('method', 'none')})")
    if ccfg.get("sensitivity") and not int8 and not pruning:
        raise ConfigError(f"compress.sensitivity measures the prune stage and int8 quantization, and this "
                          f"pipeline has neither (prune=none, quantize={mode})")
    for s in ccfg.get("sensitivity_sparsities") or []:
        limits.sparsity(s, "compress.sensitivity_sparsities")
    targets = {k: ccfg.get(k) for k in ("target_latency_ms", "target_size_bytes") if ccfg.get(k) is not None}
    if not targets:
        return
    for key, value in targets.items():
        limits.positive(value, f"compress.{key}", "the target, e.g. 0.05 (ms) or 30000 (bytes)")
    pruner = cfg.prune.get("pruner")
    if pruner is None or not getattr(instantiate(pruner, _partial_=True).func, "structural", False):
        method = cfg.prune.get("method", "none")
        raise ConfigError(f"compress.{next(iter(targets))} is met by removing channels: use prune=structured "
                          f"(the zeroed weights of prune={method} run no faster, and ONNX files do not "
                          f"shrink with them)")
    limits.sparsity(ccfg.get("max_sparsity", 0.9), "compress.max_sparsity")
    margin = limits.non_negative(ccfg.get("target_margin", 0.0), "compress.target_margin",
                                 hint="the share of the target kept in reserve, e.g. 0.05")
    if margin >= 1:
        raise ConfigError(f"compress.target_margin={margin} must be below 1 (the share of the target kept "
                          f"in reserve, e.g. 0.05)")


def check_compression(cfg: DictConfig) -> None:
    check_prune(cfg.prune, cfg.get("trainer"), *_student(cfg))
    check_quantize(cfg.quantize)
    check_budget(cfg)
    quantize = cfg.quantize
    synthetic = str(quantize.get("mode")) in ("static", "qat") and \
        str(quantize.calibration.get("source")) == "synthetic"
    if synthetic:
        from kdpipe.datafree.deepinversion import BatchNormStatistics

        model, _ = _student(cfg)
        if model is not None:  # synthesis inverts the student's batch-norm statistics: it needs some
            BatchNormStatistics(model, "student", "calibrate on the training split: "
                                "quantize.calibration.source=train").remove()

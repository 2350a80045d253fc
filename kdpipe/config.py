"""Checks on a composed config that run before any training starts.

Hydra itself rejects an unknown option in a group (listing the valid ones), and the command line
checks the range of every numeric knob (`kdpipe.limits`) before torch is imported; these checks
need the models (layer paths, output sizes) or the file system, each with a message that says how
to fix it. `validate` repeats the ranges for configs composed in Python and values a sweeper samples.
"""

from __future__ import annotations

import sys

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError

from kdpipe.compress.checks import check_compression
from kdpipe.data.base import config_example
from kdpipe.distill.checks import validate_distill
from kdpipe.errors import ConfigError
from kdpipe.exits import student_arch, with_exits
from kdpipe.limits import check_config
from kdpipe.preflight import accelerator_problem, teacher_checkpoint_problem


def _check_output_size(role: str, arch: dict, example: torch.Tensor, num_classes: int, dims: int = 2) -> None:
    try:
        if arch.get("_target_") == "kdpipe.exits.with_exits":  # its ConfigError (a bad exit path) as raised
            model = with_exits(**{k: v for k, v in arch.items() if k != "_target_"}).eval()
        else:
            model = instantiate(arch, _convert_="all").eval()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{role}.model cannot be built from {arch.get('_target_')}: {exc}") from exc
    with torch.no_grad():
        out = model(example)
    if out.dim() != dims:
        what = "next-token logits per position" if dims == 3 else "one row of class logits per sample"
        raise ConfigError(f"the {role} outputs {tuple(out.shape[1:])} values per sample, but this data needs "
                          f"{what}; pair language-model data (fortunes_lm, text_lm) with causal_lm models "
                          f"and classification data with classifiers")
    if out.shape[-1] != num_classes:
        raise ConfigError(
            f"the {role} outputs {tuple(out.shape[1:])} values per sample "
            f"but data.num_classes={num_classes}; "
            f"set {role}.model.num_classes=${{data.num_classes}} (the default) or pick a matching model"
        )


def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first nonsensical value."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator") or "auto")
    problem = accelerator_problem(accelerator)
    if problem:
        raise ConfigError(problem)
    data = cfg.data
    _, example = config_example(data)
    num_classes = int(data.num_classes)
    dims = 3 if getattr(get_class(str(data._target_)), "kind", "") == "lm" else 2  # next-token logits

    check_config(cfg)  # the ranges, also checked on the command line before this module is imported
    check_compression(cfg)

    teacher = cfg.get("teacher")
    if teacher is not None:
        problem = teacher_checkpoint_problem(teacher.get("checkpoint"))  # as the command line checks it
        if problem:
            raise ConfigError(problem)
        arch = _arch("teacher", lambda: OmegaConf.to_container(teacher.model, resolve=True), data)
        _check_output_size("teacher", arch, example, num_classes, dims)
    arch = _arch("student", lambda: student_arch(cfg), data)
    _check_output_size("student", arch, example, num_classes, dims)
    validate_distill(cfg)
    _warn_transformer_rate(cfg)


TRANSFORMERS = ("transformer_classifier", "causal_lm", "task_router", "multitask_student")


def _warn_transformer_rate(cfg: DictConfig) -> None:
    """One line when a transformer would train at the CNNs' learning rate (0.01), far above the
    1e-3 to 2e-3 small transformers train at: the run works, but learns little."""
    lr = OmegaConf.select(cfg, "optim.lr")
    targets = [str(OmegaConf.select(cfg, f"{role}.model._target_") or "") for role in ("teacher", "student")]
    if isinstance(lr, (int, float)) and lr > 3e-3 and any(t.endswith(TRANSFORMERS) for t in targets):
        print(f"kdpipe: warning: optim.lr={lr:g} is a CNN's rate; small transformers train at about 2e-3: "
              f"add optim=adamw_transformer (docs/text.md)", file=sys.stderr)


def _arch(role: str, resolve, data) -> dict:
    """A model config resolved against the data, or one line saying which model fits the data."""
    try:
        return resolve()
    except InterpolationKeyError as exc:
        text = data.get("max_length") is not None
        fix = ("text data: pick a text model, e.g. teacher=transformer student=transformer_small "
               "(language modelling: causal_lm, causal_lm_small)" if text else
               "image data: pick an image model, e.g. cnn, resnet, mlp")
        missing = str(exc.msg).split("'")[1] if "'" in str(exc.msg) else str(exc.msg)
        raise ConfigError(f"{role}.model reads {missing}, which this data has not: for {fix}") from None

"""Checks on a composed config that run before any training starts.

Hydra itself rejects an unknown option in a group (listing the valid ones), and the command line
checks the range of every numeric knob (`kdpipe.limits`) before torch is imported; these checks
need the models (layer paths, output sizes) or the file system, each with a message that says how
to fix it. `validate` repeats the ranges for configs composed in Python and values a sweeper samples.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdpipe.compress.checks import check_compression
from kdpipe.distill.checks import validate_distill
from kdpipe.errors import ConfigError
from kdpipe.exits import student_arch, with_exits
from kdpipe.limits import check_config
from kdpipe.preflight import accelerator_problem, teacher_checkpoint_problem


def _check_output_size(role: str, arch: dict, in_shape: tuple[int, ...], num_classes: int) -> None:
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
        out = model(torch.zeros(2, *in_shape))
    if out.dim() != 2 or out.shape[-1] != num_classes:
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
    in_shape = (int(data.channels), int(data.height), int(data.width))
    num_classes = int(data.num_classes)

    check_config(cfg)  # the ranges, also checked on the command line before this module is imported
    check_compression(cfg)

    teacher = cfg.get("teacher")
    if teacher is not None:
        problem = teacher_checkpoint_problem(teacher.get("checkpoint"))  # as the command line checks it
        if problem:
            raise ConfigError(problem)
        arch = OmegaConf.to_container(teacher.model, resolve=True)
        _check_output_size("teacher", arch, in_shape, num_classes)
    _check_output_size("student", student_arch(cfg), in_shape, num_classes)
    validate_distill(cfg)

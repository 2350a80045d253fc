"""Early exits (docs/early_exits.md): heads on shallow blocks of the student, trained by every
distill scheme, calibrated on the validation split, shipped as segments that stop early."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdpipe.errors import ConfigError
from kdpipe.exits.model import EarlyExitNet, exit_terms, with_exits
from kdpipe.exits.policy import CRITERIA, Policy, calibrate
from kdpipe.exits.runtime import ExitRuntime

__all__ = ["EarlyExitNet", "ExitRuntime", "Policy", "calibrate", "exit_terms", "student_arch", "with_exits"]


def student_arch(cfg: DictConfig) -> dict[str, Any]:
    """The student's model config; with `student.exits`, wrapped by `with_exits` (the model file
    keeps this arch, so the heads are rebuilt on load)."""
    arch = OmegaConf.to_container(cfg.student.model, resolve=True)
    paths = list(cfg.student.get("exits") or [])
    if not paths:
        return arch
    ecfg = OmegaConf.to_container(cfg.exits, resolve=True) if cfg.get("exits") is not None else {}
    if ecfg.get("criterion", "max_prob") not in CRITERIA:
        raise ConfigError(f"exits.criterion={ecfg.get('criterion')!r}; use one of {', '.join(CRITERIA)}")
    data = cfg.data
    return {"_target_": "kdpipe.exits.with_exits", "model": arch, "exits": [str(p) for p in paths],
            "num_classes": int(data.num_classes), "in_shape": [int(data.channels), int(data.height),
                                                               int(data.width)],
            "head_width": ecfg.get("head_width"), "loss": ecfg.get("loss")}

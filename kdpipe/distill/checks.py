"""Checks of the `distill` and `data.augment` config that run before any training: a wrong layer
path, an impossible cache request or a bad scheme option fails in a second, not after the teacher."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdpipe.data.augment import build_augmentation
from kdpipe.distill.cache import cache_blockers, use_cache
from kdpipe.errors import ConfigError
from kdpipe.losses.base import find_module
from kdpipe.models.io import build_model


def _model(node: DictConfig):
    return build_model(OmegaConf.to_container(node.model, resolve=True))


def validate_distill(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first problem of the distill scheme's config."""
    data, dcfg = cfg.data, cfg.distill
    in_shape = (int(data.channels), int(data.height), int(data.width))
    spec = data.get("augment")
    augment = build_augmentation(OmegaConf.to_container(spec, resolve=True) if spec else [], in_shape)
    example = torch.zeros(2, *in_shape)
    scheme = str(dcfg.get("scheme", "kd"))
    student = _model(cfg.student)
    if scheme == "self":
        mode = dcfg.get("mode")
        if mode not in ("born_again", "deep_to_shallow"):
            raise ConfigError(f"distill.mode={mode} must be born_again or deep_to_shallow")
        if mode == "deep_to_shallow":
            d = dcfg.deep_to_shallow
            for path in [*d.exit_layers, d.feature_layer]:
                find_module(student, str(path), "student (distill.deep_to_shallow)")
    if dcfg.get("loss") is None or cfg.get("teacher") is None:
        return
    loss = instantiate(dcfg.loss)
    teacher = _model(cfg.teacher)
    for path in loss.student_layers:
        find_module(student, path, "student")
    for path in loss.teacher_layers:
        find_module(teacher, path, "teacher")
    loss.setup(student, teacher, example)  # adapters: incompatible layer shapes fail here
    chain = dcfg.get("chain") or []
    for i, spec in enumerate(chain):
        spec = dict(OmegaConf.to_container(spec, resolve=True)) if isinstance(spec, DictConfig) else dict(spec)
        spec.setdefault("in_shape", list(in_shape))
        spec.setdefault("num_classes", int(data.num_classes))
        try:
            build_model(spec)
        except Exception as exc:
            raise ConfigError(f"distill.chain[{i}] cannot be built from {spec.get('_target_')}: {exc}") from exc
    use_cache(dcfg.get("cache_teacher", "auto"),
              cache_blockers(augment is not None, tuple(loss.teacher_layers), bool(chain)))

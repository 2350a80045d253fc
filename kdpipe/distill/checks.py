"""Checks of the `distill` and `data.augment` config that run before any training: a wrong layer
path, an impossible cache request or a bad scheme option fails in a second, not after the teacher."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from kdpipe.data.augment import build_augmentation
from kdpipe.data.base import config_example
from kdpipe.distill.schemes import DistillJob
from kdpipe.errors import ConfigError, build
from kdpipe.exits import student_arch
from kdpipe.losses import WeightedSum
from kdpipe.models.io import build_model


def _model(node: DictConfig):
    return build_model(OmegaConf.to_container(node.model, resolve=True))


def validate_distill(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first problem of the distill scheme's config."""
    data, dcfg = cfg.data, cfg.distill
    in_shape, example = config_example(data)
    spec = data.get("augment")
    augment = build_augmentation(OmegaConf.to_container(spec, resolve=True) if spec else [], in_shape,
                                 int(data.num_classes))
    scheme = build(dcfg.scheme, "distill.scheme")
    if not callable(getattr(scheme, "train", None)):
        raise ConfigError(f"distill.scheme: {dcfg.scheme._target_} has no train(job) method; a scheme "
                          f"is a class with train(job) -> the trained student (docs/extending.md)")
    needs_teacher = bool(getattr(scheme, "needs_teacher", True))
    if needs_teacher and cfg.get("teacher") is None:
        raise ConfigError(f"~teacher (no teacher) leaves nothing to distill from: "
                          f"distill={dcfg.get('name')} learns from the teacher stage; pick a teacher, "
                          f"or a scheme without one (distill=none, dml, born_again, deep_to_shallow)")
    if dcfg.get("terms"):
        WeightedSum.from_config(dcfg.terms)  # every term builds: bad keys and values fail here
    check = getattr(scheme, "check", None)
    if check is not None:
        arch = student_arch(cfg)
        job = DistillJob(dcfg, arch, int(data.num_classes), example, augment)
        check(job, build_model(arch), _model(cfg.teacher) if needs_teacher else None)

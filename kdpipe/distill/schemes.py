"""Training regimes of the distill stage, each a class named by `distill.scheme._target_`.

A scheme gets a `DistillJob` (the student's config, the data, the optimiser, the loss terms of
`distill.terms`, the trained teacher when it needs one, and a `Fitter` for its Lightning fits)
and returns the trained student. `needs_teacher` says whether the teacher stage is an input: a
user's own regime is any class with that attribute and `train(job) -> nn.Module`, and may define
`check(student, teacher, example)` to reject a bad config before any training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kdpipe import limits
from kdpipe.distill.cache import (
    CACHE_TAG,
    cache_blockers,
    cached_train_loader,
    feature_blocker,
    teacher_train_features,
    teacher_train_logits,
    use_cache,
)
from kdpipe.errors import ConfigError
from kdpipe.losses.base import WeightedSum, find_module
from kdpipe.models import count_params
from kdpipe.models.ensemble import EnsembleTeacher
from kdpipe.models.io import build_model
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.modules.mutual import MutualLearningModule
from kdpipe.modules.self_distill import SelfDistillationModule
from kdpipe.training import Fitter, Optim, val_acc

log = logging.getLogger("kdpipe")


@dataclass
class DistillJob:
    """Everything a scheme trains with. `teacher` is the teacher stage's model (None when the
    scheme does not need it); `teacher_run_id`/`teacher_key` locate its run for the logit cache.
    `check` gets a job without fitter, data or teacher weights: the config alone."""

    config: DictConfig  # the `distill` section: terms, max_epochs, ...
    student_arch: dict[str, Any]
    num_classes: int
    example_input: torch.Tensor  # a batch of 2, for probing layer shapes
    augment: nn.Module | None = None
    fitter: Fitter | None = None  # the rest is given when training, not when checking the config
    datamodule: Any = None
    workdir: Path | None = None
    optim: Optim | None = None
    teacher: nn.Module | None = None
    teacher_run_id: str | None = None
    teacher_key: str | None = None

    @property
    def max_epochs(self) -> int:
        return int(self.config.max_epochs)

    def build_student(self, arch: dict[str, Any] | None = None) -> nn.Module:
        return build_model(arch or self.student_arch)

    def loss(self) -> WeightedSum:
        """A fresh loss from `distill.terms` (adapters are trained per student)."""
        return WeightedSum.from_config(self.config.get("terms"))

    def classifier(self, model: nn.Module) -> ClassifierModule:
        return ClassifierModule(model, self.num_classes, self.optim, self.augment)

    def distiller(self, student: nn.Module, teacher: nn.Module, loss: WeightedSum) -> DistillationModule:
        return DistillationModule(student, teacher, loss, self.num_classes, self.example_input,
                                  self.optim, self.augment)


def transfer_loader(datamodule):
    """Every training image, labeled or not (`data.labeled_fraction`): what a student learns
    from a teacher on. A data module without `transfer_dataloader` gives its training loader."""
    return getattr(datamodule, "transfer_dataloader", datamodule.train_dataloader)()


def log_val_acc(name: str, trainer, step: int) -> None:
    """A per-fit validation accuracy (a fit restored whole after a kill validated nothing here)."""
    acc = val_acc(trainer)
    if acc == acc:
        mlflow.log_metric(name, acc, step=step)


class Scratch:
    """The baseline every scheme is compared with: the student on hard labels alone."""

    needs_teacher = False

    def train(self, job: DistillJob) -> nn.Module:
        student = job.build_student()
        job.fitter.fit(job.classifier(student), "student", job.max_epochs)
        return student


def capacity_gap_message(student: nn.Module, teacher: nn.Module, fraction: float) -> str | None:
    """Mirzadeh et al. (2020): past some teacher/student size ratio a better teacher makes a
    worse student; an intermediate 'teacher assistant' bridges the gap."""
    n_s, n_t = count_params(student)[0], count_params(teacher)[0]
    if n_t == 0 or n_s >= fraction * n_t:
        return None
    return (f"capacity gap: the student has {n_s:,} parameters, "
            f"{100 * n_s / n_t:.1f}% of the teacher's {n_t:,} "
            f"(below distill.scheme.capacity_gap_fraction={fraction}); distillation can then do worse than "
            f"training from scratch (Mirzadeh et al. 2020). Consider a teacher-assistant chain, e.g. "
            f"'distill.scheme.chain=[{{_target_:kdpipe.models.cnn,width:16,depth:3}}]', more epochs, or a "
            f"larger student")


class Offline:
    """The student learns from the frozen teacher of the teacher stage through `distill.terms`
    (KD, DKD, hints, attention, relations...), optionally through a teacher-assistant chain
    (Mirzadeh et al. 2020): each `chain` entry, a model config, is distilled in turn and teaches
    the next. Without augmentation or a chain, the teacher's logits, and the teacher features the
    loss reads when they fit `cache_features_gb`, are computed once per training set and stored
    with its run (`cache_teacher: auto`)."""

    needs_teacher = True

    def __init__(self, cache_teacher: str | bool = "auto", chain: Sequence[dict] = (),
                 capacity_gap_fraction: float = 0.05, ensemble_temperature: float | None = None,
                 cache_topk: int = 64, cache_features_gb: float = 1.0) -> None:
        self.cache_teacher = str(cache_teacher).lower()
        self.cache_features_gb = limits.non_negative(
            cache_features_gb, "distill.scheme.cache_features_gb",
            "the GiB of teacher features a cache may hold; 0 caches the logits alone")
        self.cache_topk = limits.positive_int(cache_topk, "distill.scheme.cache_topk",
                                              "the teacher logits kept per token of a language model")
        use_cache(self.cache_teacher, [])  # the mode's spelling is checked here, its feasibility in check()
        if isinstance(chain, ListConfig):  # `_recursive_: false` hands the model configs over unbuilt
            chain = OmegaConf.to_container(chain, resolve=True)
        self.chain = [dict(spec) for spec in chain or []]
        self.capacity_gap_fraction = float(capacity_gap_fraction)
        self.ensemble_temperature = None if ensemble_temperature is None else limits.temperature(
            ensemble_temperature, "distill.scheme.ensemble_temperature")

    def chain_archs(self, student_arch: dict[str, Any]) -> list[dict[str, Any]]:
        """`chain` entries as model configs, with the data's shape of the student filled in."""
        return [{"in_shape": student_arch["in_shape"], "num_classes": student_arch["num_classes"], **spec}
                for spec in self.chain]

    def check(self, job: DistillJob, student: nn.Module, teacher: nn.Module) -> None:
        loss = job.loss()
        for path in loss.student_layers:
            find_module(student, path, "student")
        for path in loss.teacher_layers:
            find_module(teacher, path, "teacher")
        loss.setup(student, teacher, job.example_input)  # adapters: incompatible layer shapes fail here
        for i, arch in enumerate(self.chain_archs(job.student_arch)):
            try:
                build_model(arch)
            except Exception as exc:
                raise ConfigError(f"distill.scheme.chain[{i}] cannot be built from {arch.get('_target_')}: "
                                  f"{exc}") from exc
        use_cache(self.cache_teacher, self.cache_blockers(job, loss, teacher))

    def cache_blockers(self, job: DistillJob, loss: WeightedSum, teacher: nn.Module) -> list[str]:
        """Why the teacher's outputs cannot be cached (the size of its features only once the
        training set is loaded)."""
        n = len(job.datamodule.train_set) if job.datamodule is not None else None
        return cache_blockers(job.augment is not None, bool(self.chain),
                              feature_blocker(teacher, loss.teacher_layers, job.example_input, n,
                                              self.cache_features_gb))

    def train(self, job: DistillJob) -> nn.Module:
        teacher = job.teacher
        if isinstance(teacher, EnsembleTeacher) and self.ensemble_temperature is not None:
            teacher.temperature = self.ensemble_temperature  # average the members' distributions at T
        for i, arch in enumerate(self.chain_archs(job.student_arch)):
            assistant = build_model(arch)
            trainer = job.fitter.fit(job.distiller(assistant, teacher, job.loss()), f"ta{i}", job.max_epochs,
                                     train_loader=transfer_loader(job.datamodule))
            log_val_acc("chain/val_acc", trainer, i)
            teacher = assistant.eval()
        student = job.build_student()
        gap = capacity_gap_message(student, teacher, self.capacity_gap_fraction)
        if gap:
            log.warning(gap)
            mlflow.set_tag("kdpipe.capacity_gap",
                           f"{count_params(student)[0] / count_params(teacher)[0]:.4f}")
        loss = job.loss()
        module = job.distiller(student, teacher, loss)
        blockers = self.cache_blockers(job, loss, teacher)
        if use_cache(self.cache_teacher, blockers):
            suffix = f"_T{teacher.temperature:g}" if isinstance(teacher, EnsembleTeacher) else ""
            logits = teacher_train_logits(job.datamodule, job.workdir, job.teacher_run_id, job.teacher_key,
                                          teacher, suffix, self.cache_topk)
            features = {}
            if loss.teacher_layers:
                features = teacher_train_features(job.datamodule, job.workdir, job.teacher_run_id,
                                                  job.teacher_key, teacher, loss.teacher_layers)
            loader = cached_train_loader(job.datamodule, logits, features)
            module.cached_layers = tuple(features)
        else:
            if self.cache_teacher == "auto":
                log.info("distill: the teacher runs every step: %s", "; ".join(blockers))
            mlflow.set_tag(CACHE_TAG, "off")
            loader = transfer_loader(job.datamodule)
        job.fitter.fit(module, "student", job.max_epochs, train_loader=loader)
        return student


class MutualLearning:
    """Deep mutual learning (Zhang, Xiang, Hospedales & Lu 2018): `peers` copies of the student
    trained together from scratch, each taught by the others; no pretrained teacher. Peer 0 is
    exported."""

    needs_teacher = False

    def __init__(self, peers: int = 2, temperature: float = 1.0) -> None:
        self.peers = limits.positive_int(peers, "distill.scheme.peers", "mutual learning needs a cohort")
        if self.peers < 2:
            raise ConfigError(f"distill.scheme.peers={peers} must be >= 2: mutual learning needs a cohort")
        self.temperature = limits.temperature(temperature, "distill.scheme.temperature")

    def train(self, job: DistillJob) -> nn.Module:
        peers = [job.build_student() for _ in range(self.peers)]
        module = MutualLearningModule(peers, job.num_classes, self.temperature, job.optim, job.augment)
        job.fitter.fit(module, "peers", job.max_epochs)
        return peers[0]


class BornAgain:
    """Born-again networks (Furlanello, Lipton, Tschannen, Itti & Anandkumar 2018, eq. 1-2):
    generation 0 is trained on labels; generation k+1, same architecture, learns from generation
    k through `distill.terms` (the paper: pure teacher matching at T=1). No separate teacher."""

    needs_teacher = False

    def __init__(self, generations: int = 2) -> None:
        self.generations = limits.positive_int(generations, "distill.scheme.generations", "e.g. 2")

    def train(self, job: DistillJob) -> nn.Module:
        model = job.build_student()
        trainer = job.fitter.fit(job.classifier(model), "gen0", job.max_epochs)
        log_val_acc("self/generation_val_acc", trainer, 0)
        for gen in range(1, self.generations + 1):
            student = job.build_student()
            trainer = job.fitter.fit(job.distiller(student, model.eval(), job.loss()), f"gen{gen}",
                                     job.max_epochs)
            log_val_acc("self/generation_val_acc", trainer, gen)
            model = student
        return model


class DeepToShallow:
    """"Be Your Own Teacher" (Zhang et al. 2019): auxiliary exits on shallow blocks (module paths)
    learn from the deepest classifier; they are dropped at export. No separate teacher."""

    needs_teacher = False

    def __init__(self, exit_layers: Sequence[str] = ("features.0",), feature_layer: str = "pool",
                 alpha: float = 0.3, temperature: float = 3.0, feature_weight: float = 0.03) -> None:
        self.exit_layers, self.feature_layer = list(exit_layers), str(feature_layer)
        self.alpha = limits.unit_interval(alpha, "distill.scheme.alpha", "the exits' KD term against CE")
        self.temperature = limits.temperature(temperature, "distill.scheme.temperature")
        self.feature_weight = limits.weight(feature_weight, "distill.scheme.feature_weight")

    def check(self, job: DistillJob, student: nn.Module, teacher: nn.Module | None) -> None:
        for path in [*self.exit_layers, self.feature_layer]:
            find_module(student, path, "student (distill.scheme.exit_layers / feature_layer)")

    def train(self, job: DistillJob) -> nn.Module:
        student = job.build_student()
        module = SelfDistillationModule(student, job.num_classes, job.example_input, self.exit_layers,
                                        self.feature_layer, self.alpha, self.feature_weight, self.temperature,
                                        job.optim, job.augment)
        job.fitter.fit(module, "student", job.max_epochs)
        return student


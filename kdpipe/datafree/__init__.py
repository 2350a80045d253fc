"""Data-free distillation (docs/data_free.md): the student learns from inputs synthesised from
the teacher, never from a real training image."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import mlflow
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdpipe import limits
from kdpipe.data.augment import build_augmentation
from kdpipe.datafree.deepinversion import BatchNormStatistics, synthesize
from kdpipe.distill.cache import compute_logits, stored_with_run
from kdpipe.errors import ConfigError
from kdpipe.losses.base import find_module

log = logging.getLogger("kdpipe")

ARTIFACT_DIR = "synthetic"

__all__ = ["AdversarialDataFree", "DeepInversion", "synthesize"]

LOSSES = ("l1", "kl")


class DeepInversion:
    """The student distilled, through `distill.terms`, on a transfer set synthesised from the teacher
    by DeepInversion (`kdpipe.datafree.deepinversion`): `num_images` inputs with balanced target
    classes, each batch optimised `steps` steps. The set is stored with the teacher's run, keyed by
    the teacher and these settings, so every student of a sweep reuses it; a grid of it per class is
    logged on the distill run (`synthetic/grid.png`). The student sees `augment`ed views of the set
    (or `data.augment`'s), which the teacher scores live; without augmentation the teacher's logits
    are computed once. The validation and test splits stay real: they measure the student, and train
    nothing."""

    needs_teacher = True

    def __init__(self, num_images: int = 2048, batch_size: int = 256, steps: int = 200, lr: float = 0.1,
                 bn: float = 1.0, first_bn: float = 10.0, ce: float = 1.0, tv: float = 1e-3, l2: float = 0.0,
                 jitter: int = 2, flip: bool = False, relative: bool = True,
                 augment: Sequence[Any] | None = ("crop", "flip", "cutmix")) -> None:
        name = "distill.scheme"
        self.augment = list(augment or [])
        self.num_images = limits.positive_int(num_images, f"{name}.num_images", "e.g. 2048")
        self.batch_size = limits.positive_int(batch_size, f"{name}.batch_size", "e.g. 256")
        self.steps = limits.positive_int(steps, f"{name}.steps", "e.g. 200")
        self.options = {"steps": self.steps,
                        "lr": limits.positive(lr, f"{name}.lr", "Adam's step on the inputs"),
                        "bn": limits.weight(bn, f"{name}.bn"),
                        "first_bn": limits.weight(first_bn, f"{name}.first_bn"),
                        "ce": limits.weight(ce, f"{name}.ce"),
                        "tv": limits.weight(tv, f"{name}.tv"), "l2": limits.weight(l2, f"{name}.l2"),
                        "jitter": limits.whole_number(jitter, f"{name}.jitter", "pixels, e.g. 2"),
                        "flip": bool(flip), "relative": bool(relative)}

    def check(self, job, student: nn.Module, teacher: nn.Module) -> None:
        BatchNormStatistics(teacher).remove()  # a teacher without batch norm: the clear error, now
        self.augmentation(job)  # an unknown augmentation: its error, now
        loss = job.loss()
        for path in loss.student_layers:
            find_module(student, path, "student")
        for path in loss.teacher_layers:
            find_module(teacher, path, "teacher")

    def key(self, job) -> str:
        spec = {"teacher": job.teacher_key, "n": self.num_images, "batch": self.batch_size,
                "seed": torch.initial_seed(), "shape": list(job.example_input.shape[1:]),
                "classes": job.num_classes, **self.options}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def transfer_set(self, job) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthesised (images, targets): from the teacher run's artefacts, else made and stored."""
        name, source = f"{self.key(job)}.pt", job.teacher_run_id

        def make() -> dict:
            images, targets = self._synthesize(job)
            return {"images": images, "targets": targets}

        def complete(d) -> bool:
            return isinstance(d, dict) and len(d.get("images", ())) == self.num_images

        data, reused = stored_with_run(source, f"{job.teacher_key}/{ARTIFACT_DIR}/{name}", ARTIFACT_DIR, name,
                                       job.workdir / ARTIFACT_DIR, make, complete)
        mlflow.set_tag("kdpipe.synthetic", f"reused:{source}" if reused else "computed")
        if reused:
            log.info("distill: synthetic transfer set reused from run %s", source)
        return data["images"], data["targets"]

    def _synthesize(self, job) -> tuple[torch.Tensor, torch.Tensor]:
        batches = -(-self.num_images // self.batch_size)
        t0 = time.time()

        def on_batch(b: int, n: int) -> None:
            left = (time.time() - t0) / (b + 1) * (batches - b - 1)
            log.info("distill: synthesised batch %d/%d (%d inputs), about %.0f s left",
                     b + 1, batches, n, left)

        def on_step(b: int, step: int, losses: dict[str, float]) -> None:
            if b == 0 and (step % 10 == 0 or step == self.steps - 1):  # the first batch's curves
                mlflow.log_metrics({f"synthesis/loss_{k}": v for k, v in losses.items()}, step=step)

        return synthesize(job.teacher, self.num_images, tuple(job.example_input.shape[1:]), job.num_classes,
                          self.batch_size, torch.initial_seed(), on_batch, on_step, **self.options)

    def augmentation(self, job) -> nn.Module | None:
        """`data.augment` when it is set, else this scheme's `augment`: applied to the synthesised set."""
        if job.augment is not None:
            return job.augment
        return build_augmentation(self.augment, tuple(job.example_input.shape[1:]), job.num_classes,
                                  key="distill.scheme.augment")

    def train(self, job) -> nn.Module:
        from kdpipe.datafree.grid import class_grid

        images, targets = self.transfer_set(job)
        grid = class_grid(images, targets, job.num_classes, job.workdir / ARTIFACT_DIR / "grid.png")
        mlflow.log_artifact(str(grid), artifact_path=ARTIFACT_DIR)
        loss = job.loss()
        augment = self.augmentation(job)
        columns = (images, targets)
        if augment is None and not loss.teacher_layers:  # the teacher's logits on the set, computed once
            columns = (*columns, compute_logits(job.teacher, TensorDataset(images)))
        loader = job.datamodule._loader(TensorDataset(*columns), shuffle=True)
        student = job.build_student()
        # augmented: the teacher scores each new view, live
        module = replace(job, augment=augment).distiller(student, job.teacher, loss)
        job.fitter.fit(module, "student", job.max_epochs, train_loader=loader)
        return student


class AdversarialDataFree:
    """Data-free KD with a generator trained against the student (`kdpipe.datafree.adversarial`):
    an epoch is `steps_per_epoch` rounds of one generator step and `student_steps` student steps on
    `batch_size` generated inputs. No training image and no batch norm needed (the teacher's
    batch-norm statistics are used when it has them, weight `bn`). A grid of generated inputs, one
    row per class the teacher assigns them, is logged as `synthetic/grid.png`."""

    needs_teacher = True

    def __init__(self, steps_per_epoch: int = 50, batch_size: int = 256, student_steps: int = 5,
                 nz: int = 100,
                 generator_width: int = 64, generator_lr: float = 1e-3, loss: str = "l1",
                 temperature: float = 1.0, bn: float = 1.0, balance: float = 5.0) -> None:
        name = "distill.scheme"
        if loss not in LOSSES:
            raise ConfigError(f"{name}.loss={loss!r}; use l1 (DFAD) or kl (ZSKT)")
        self.steps_per_epoch = limits.positive_int(steps_per_epoch, f"{name}.steps_per_epoch", "e.g. 50")
        self.generator_args = {"nz": limits.positive_int(nz, f"{name}.nz", "e.g. 100"),
                               "width": limits.positive_int(generator_width, f"{name}.generator_width",
                                                            "e.g. 64")}
        self.module_args = {
            "batch_size": limits.positive_int(batch_size, f"{name}.batch_size", "e.g. 256"),
            "student_steps": limits.positive_int(student_steps, f"{name}.student_steps", "e.g. 5"),
            "generator_lr": limits.positive(generator_lr, f"{name}.generator_lr", "Adam's learning rate"),
            "loss": loss, "temperature": limits.temperature(temperature, f"{name}.temperature"),
            "bn": limits.weight(bn, f"{name}.bn"), "balance": limits.weight(balance, f"{name}.balance")}

    def train(self, job) -> nn.Module:
        from kdpipe.datafree.adversarial import AdversarialDataFreeModule, Generator
        from kdpipe.datafree.grid import class_grid

        student = job.build_student()
        generator = Generator(tuple(job.example_input.shape[1:]), **self.generator_args)
        module = AdversarialDataFreeModule(student, job.teacher, generator, job.num_classes, job.optim,
                                           **self.module_args)
        rounds = job.datamodule._loader(TensorDataset(torch.zeros(self.steps_per_epoch, 1)), shuffle=False,
                                        batch_size=1)
        try:
            job.fitter.fit(module, "student", job.max_epochs, train_loader=rounds)
        finally:
            if module.stats is not None:
                module.stats.remove()
        with torch.no_grad():
            x = generator.eval()(torch.randn(20 * job.num_classes, generator.nz))
            y = job.teacher(x).argmax(-1)
        grid = class_grid(x, y, job.num_classes, job.workdir / ARTIFACT_DIR / "grid.png")
        mlflow.log_artifact(str(grid), artifact_path=ARTIFACT_DIR)
        return student

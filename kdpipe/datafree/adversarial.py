"""Generator-based adversarial data-free KD: a generator makes inputs on which the student disagrees
with the teacher, and the student learns to agree on them (ZSKT, Micaelli & Storkey 2019; DFAD,
Fang et al. 2019, whose L1 disagreement on logits this follows by default; DAFL, Chen et al. 2019,
adds the class-balance term). The teacher's batch-norm statistics, when it has them, pull the
generated inputs towards what the teacher saw in training (as in DeepInversion)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.datafree.deepinversion import _BN, BatchNormStatistics
from kdpipe.losses.response import soft_kl
from kdpipe.modules.classifier import ClassifierModule
from kdpipe.training import Optim


class Generator(nn.Module):
    """z -> an input of `in_shape`: a linear layer to a map at a quarter of the size, two
    upsample-conv-BN-LeakyReLU blocks, a 3x3 conv to the channels, resized to the exact size and
    standardised per channel (BN without affine), the scale of kdpipe's normalised inputs."""

    def __init__(self, in_shape: Sequence[int], nz: int = 100, width: int = 64) -> None:
        super().__init__()
        c, h, w = (int(d) for d in in_shape)
        self.size, self.nz = (h, w), int(nz)
        self.h0, self.w0 = max(h // 4, 1), max(w // 4, 1)
        self.fc = nn.Linear(nz, 2 * width * self.h0 * self.w0)
        self.width = width
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, c, 3, padding=1))
        self.out = nn.BatchNorm2d(c, affine=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.body(self.fc(z).view(len(z), 2 * self.width, self.h0, self.w0))
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.out(x)


def disagreement(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """How far the student's logits are from the teacher's: mean absolute difference (`l1`, DFAD)
    or the softened KL (`kl`, ZSKT)."""
    if kind == "l1":
        return (student - teacher).abs().mean()
    return soft_kl(student, teacher, temperature)


class AdversarialDataFreeModule(ClassifierModule):
    """Each training step: one generator step that maximises the disagreement (minus `bn` times the
    teacher's batch-norm statistics loss, minus `balance` times the entropy of the batch's mean
    teacher prediction), then `student_steps` student steps that minimise it on fresh generated
    batches. Manual optimisation: the student with the configured optimiser, the generator with
    Adam at `generator_lr`. Logs `train/loss_student`, `train/loss_generator` and the generator's
    `train/generator_bn` and `train/generator_balance`. Validation is on the real validation split."""

    def __init__(self, student: nn.Module, teacher: nn.Module, generator: Generator, num_classes: int,
                 optim: Optim, batch_size: int = 256, student_steps: int = 5, generator_lr: float = 1e-3,
                 loss: str = "l1", temperature: float = 1.0, bn: float = 1.0, balance: float = 5.0) -> None:
        super().__init__(student, num_classes, optim)
        self.automatic_optimization = False
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.generator = generator
        self.batch_size, self.student_steps = int(batch_size), int(student_steps)
        self.generator_lr, self.kind, self.temperature = float(generator_lr), loss, float(temperature)
        self.bn, self.balance = float(bn), float(balance)
        has_bn = any(isinstance(m, _BN) for m in teacher.modules())
        self.stats = BatchNormStatistics(teacher) if (has_bn and self.bn > 0) else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        student = self.optim.configure(self.trainable_parameters(), int(self.trainer.max_epochs or 1))
        gen = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr)
        if isinstance(student, dict):
            return [student["optimizer"], gen], [student["lr_scheduler"]]
        return [student, gen]

    def _z(self) -> torch.Tensor:
        return torch.randn(self.batch_size, self.generator.nz, device=self.device)

    def training_step(self, batch, batch_idx: int) -> None:
        opt_s, opt_g = self.optimizers()
        # the generator: find inputs where the student disagrees with the teacher
        self.model.eval()  # the student's batch statistics do not move on the generator's step
        x = self.generator(self._z())
        if self.stats is not None:
            self.stats.terms = []
        t = self.teacher(x)
        bn = self.stats.loss() if self.stats is not None else x.new_zeros(())
        mean_p = F.softmax(t, -1).mean(0)
        balance = (mean_p * mean_p.clamp_min(1e-8).log()).sum()  # minus the entropy: low when balanced
        gap = disagreement(self.model(x), t, self.kind, self.temperature)
        loss_g = -gap + self.bn * bn + self.balance * balance
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        self.model.train()
        # the student: agree with the teacher on fresh generated inputs
        total = 0.0
        for _ in range(self.student_steps):
            with torch.no_grad():
                x = self.generator(self._z())
                t = self.teacher(x)
                if self.stats is not None:
                    self.stats.terms = []
            loss_s = disagreement(self.model(x), t, self.kind, self.temperature)
            if not torch.isfinite(loss_s):
                raise FloatingPointError(f"the student's loss became {loss_s.item()} at epoch "
                                         f"{self.current_epoch}; lower the learning rate")
            opt_s.zero_grad(set_to_none=True)
            self.manual_backward(loss_s)
            opt_s.step()
            total += float(loss_s.detach())
        log = {"train/loss_student": total / self.student_steps,
               "train/loss_generator": float(loss_g.detach()),
               "train/generator_bn": float(bn.detach()), "train/generator_balance": float(balance.detach())}
        self.log_dict(log, on_step=False, on_epoch=True, batch_size=self.batch_size)

    def on_train_epoch_end(self) -> None:
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

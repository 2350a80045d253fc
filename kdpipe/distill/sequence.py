"""Sequence-level knowledge distillation (Kim & Rush 2016, sec. 3.2) for causal language models:
the student is trained on sequences the teacher generated, not only on the teacher's per-token
distributions over the real text.

For each training document the teacher continues its first `prefix_tokens` tokens to the
document's length (greedy, as Kim & Rush's beam of 1, or sampled at `temperature`), and the
student is trained with the next-token cross-entropy on those generated sequences, together with
the real documents when `mix_real` (their "sequence-level interpolation" keeps the real data in).
The generated set is stored with the teacher's run (`synthetic/`, keyed by the teacher and these
settings), so students of a sweep generate it once.
"""

from __future__ import annotations

import logging

import mlflow
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdpipe.data.base import UNLABELED
from kdpipe.distill.cache import stored_with_run
from kdpipe.distill.schemes import DistillJob
from kdpipe.errors import ConfigError

log = logging.getLogger("kdpipe")


@torch.no_grad()
def generate(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, prefix_tokens: int, greedy: bool = True,
             temperature: float = 1.0, eos_id: int = 2, pad_id: int = 0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets) like the data's, of the teacher's continuations of each row's
    first `prefix_tokens` tokens, at most as long as the row's own sequence; a row ends at <eos>."""
    teacher.eval()
    length = x.shape[1]
    full = torch.full((len(x), length + 1), pad_id, dtype=x.dtype)  # <bos> text <eos>, as the data made it
    full[:, 0] = x[:, 0]
    full[:, 1:] = torch.where(y != UNLABELED, y, torch.full_like(y, pad_id))
    total = (full != pad_id).sum(1)
    seq = full.clone()
    seq[:, prefix_tokens:] = pad_id
    done = torch.zeros(len(x), dtype=torch.bool)
    for t in range(prefix_tokens, length + 1):
        live = (t < total) & ~done
        if not bool(live.any()):
            break
        logits = teacher(seq[:, :t])[:, -1]
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        seq[:, t] = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        done |= live & (nxt == eos_id)
    inputs = seq[:, :length].clone()
    inputs[inputs == eos_id] = pad_id  # <eos> is a target, never an input
    target = seq[:, 1:].clone()
    target[target == pad_id] = UNLABELED
    return inputs, target


class SequenceLevel:
    """Kim & Rush's sequence-level KD: the student learns (next-token CE) from the teacher's own
    continuations of the training documents' prefixes, plus the real documents when `mix_real`."""

    needs_teacher = True

    def __init__(self, prefix_tokens: int = 8, greedy: bool = True, temperature: float = 1.0,
                 mix_real: bool = True, batch_size: int = 256) -> None:
        if int(prefix_tokens) < 1:
            raise ConfigError(f"distill.scheme.prefix_tokens={prefix_tokens}: give at least 1 (the <bos>)")
        self.prefix_tokens, self.greedy = int(prefix_tokens), bool(greedy)
        self.temperature, self.mix_real, self.batch_size = float(temperature), bool(mix_real), int(batch_size)

    def check(self, job: DistillJob, student: nn.Module, teacher: nn.Module) -> None:
        if job.example_input.dim() != 2 or teacher(job.example_input).dim() != 3:
            raise ConfigError("distill=sequence_kd distils a causal language model: use data=fortunes_lm or "
                              "text_lm with teacher=causal_lm and a causal_lm student")

    def transfer_set(self, job: DistillJob) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = job.datamodule.train_set.tensors
        settings = {"prefix": self.prefix_tokens, "greedy": self.greedy, "T": self.temperature}
        name = "sequences_" + "_".join(f"{k}{v}" for k, v in settings.items()) + ".pt"

        def compute() -> dict:
            g = torch.Generator().manual_seed(0)
            b = self.batch_size
            parts = [generate(job.teacher, x[i:i + b], y[i:i + b], self.prefix_tokens, self.greedy,
                              self.temperature, generator=g) for i in range(0, len(x), b)]
            return {"x": torch.cat([p[0] for p in parts]), "y": torch.cat([p[1] for p in parts])}

        stored, reused = stored_with_run(job.teacher_run_id, f"{job.teacher_key}/{name}", "synthetic", name,
                                         job.workdir / "synthetic", compute,
                                         lambda v: isinstance(v, dict) and len(v.get("x", ())) == len(x))
        mlflow.set_tag("kdpipe.sequences", f"reused:{job.teacher_run_id}" if reused else "computed")
        return stored["x"], stored["y"]

    def train(self, job: DistillJob) -> nn.Module:
        gx, gy = self.transfer_set(job)
        x, y = job.datamodule.train_set.tensors
        if self.mix_real:
            gx, gy = torch.cat([x, gx]), torch.cat([y, gy])
        log.info("distill: %d teacher-generated sequences%s", len(x),
                 " plus the real ones" if self.mix_real else "")
        student = job.build_student()
        loader = job.datamodule._loader(TensorDataset(gx, gy), shuffle=True)
        job.fitter.fit(job.classifier(student), "student", job.max_epochs, train_loader=loader)
        return student

"""Multi-task distillation models (TextBrewer's multi-teacher distiller): one student with a head per
task learns from one teacher per task at once.

A multi-task sample starts with its task's token (`<task0>`, `<task1>`, ... right after kdpipe's
special tokens; kdpipe.data.text.MultiTaskTextDataModule puts it there) and its label is global:
task k's classes are `offset_k .. offset_k + size_k - 1`. Both models output logits over every
task's classes with the other tasks' classes masked (`MASKED`), so a sample's softmax is over its
own task's classes only. Every loss term, metric, export and quantizer then works unchanged: CE and
KD of a sample are its task's, and the argmax is always one of its task's classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

MASKED = -1e4  # a logit whose probability underflows to 0 in float32 softmax, and stays finite


def task_rows(target: torch.Tensor, task_ranges: Mapping[str, tuple[int, int]] | None):
    """(task, bool mask of the rows whose global label is that task's) for each task with rows: how
    per-task metrics are cut out of a multi-task batch or split."""
    for name, (lo, hi) in (task_ranges or {}).items():
        rows = (target >= lo) & (target < hi)
        if bool(rows.any()):
            yield name, rows


def task_mask(ids: torch.Tensor, sizes: Sequence[int], token_base: int) -> torch.Tensor:
    """(B, sum(sizes)) bool: True on the classes of each sample's task (read from its first token)."""
    task = (ids[:, 0] - token_base).clamp(0, len(sizes) - 1)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=ids.device),
                                    torch.tensor(list(sizes), device=ids.device))
    return owner.unsqueeze(0) == task.unsqueeze(1)


class MultiTaskStudent(nn.Module):
    """A shared model (`body`, e.g. a transformer classifier over all tasks' classes) whose output
    layer's slice per task is that task's head, masked to the sample's task."""

    def __init__(self, body: nn.Module, tasks: Sequence[int], token_base: int = 4) -> None:
        super().__init__()
        self.body, self.sizes, self.token_base = body, [int(s) for s in tasks], int(token_base)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.body(ids)
        return logits.masked_fill(~task_mask(ids, self.sizes, self.token_base), MASKED)


class TaskRouter(nn.Module):
    """One teacher per task (`teachers`, in task order), each over its own task's classes; a sample
    gets its task's teacher's logits in its task's slice. Trained as one model on mixed batches,
    each teacher learns from its own task's samples only (the others are masked out of its loss)."""

    def __init__(self, teachers: Mapping[str, nn.Module] | Sequence[nn.Module], token_base: int = 4) -> None:
        super().__init__()
        items = teachers.items() if isinstance(teachers, Mapping) else enumerate(teachers)
        self.teachers = nn.ModuleDict({str(k): m for k, m in items})
        self.token_base = int(token_base)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outs = [t(ids) for t in self.teachers.values()]  # every teacher runs: exportable, no gather
        sizes = [o.shape[-1] for o in outs]
        return torch.cat(outs, -1).masked_fill(~task_mask(ids, sizes, self.token_base), MASKED)


def multitask_student(in_shape: Sequence[int], num_classes: int, body: nn.Module, tasks: Sequence[int],
                      token_base: int = 4) -> nn.Module:
    """`body` is a model config over all `num_classes` (= the sum of `tasks`, each task's class count)."""
    if sum(int(s) for s in tasks) != int(num_classes):
        raise ValueError(f"the tasks' class counts {list(tasks)} do not add up to num_classes={num_classes}")
    return MultiTaskStudent(body, tasks, token_base)


def task_router(in_shape: Sequence[int], num_classes: int, teachers: Mapping[str, nn.Module],
                token_base: int = 4) -> nn.Module:
    """`teachers`: a model config per task, in the data's task order, each over its own classes."""
    return TaskRouter(teachers, token_base)

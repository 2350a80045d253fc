"""The exit rule and its calibration: an input leaves at the first exit whose confidence reaches that
exit's threshold. Thresholds are chosen on the validation split, for the lowest average cost per
sample whose accuracy stays within `max_acc_drop` points of the same network run to the end."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

CRITERIA = ("max_prob", "entropy")
NEVER = math.inf  # a threshold no confidence reaches: the exit is never taken


def confidence(logits: np.ndarray | torch.Tensor, criterion: str) -> np.ndarray:
    """Per-sample confidence in [0, 1]: the top softmax probability (`max_prob`), or one minus the
    entropy over its maximum log(classes) (`entropy`: low entropy, high confidence). NumPy, since
    the runtime calls it between two ONNX Runtime calls on every sample."""
    z = np.asarray(logits, dtype=np.float32)
    e = np.exp(z - z.max(-1, keepdims=True))
    total = e.sum(-1)
    if criterion == "max_prob":
        return 1.0 / total  # the top class's exp is 1
    if criterion == "entropy":
        p = e / total[..., None]
        h = -(p * np.log(np.maximum(p, 1e-12))).sum(-1)
        return 1.0 - h / math.log(z.shape[-1])
    raise ValueError(f"exits.criterion={criterion!r}; use one of {', '.join(CRITERIA)}")


def confidences(logits: list[torch.Tensor], criterion: str) -> torch.Tensor:
    """exits x samples: the confidence of every exit (the final head's logits, last, are left out)."""
    return torch.from_numpy(np.stack([confidence(z, criterion) for z in logits[:-1]]))


def route(conf: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """The exit each sample leaves at (len(thresholds) = the final head), from its confidences
    (exits x samples) at each exit."""
    n_exits, n = conf.shape
    where = torch.full((n,), n_exits, dtype=torch.long)
    for e in reversed(range(n_exits)):
        where[conf[e] >= thresholds[e]] = e
    return where


@dataclass
class Policy:
    criterion: str
    thresholds: list[float]  # per exit; inf: never taken
    acc: float  # on the split it was calibrated on
    full_acc: float
    avg_cost: float  # per sample, in the units of `costs` (FLOPs)
    full_cost: float
    fractions: list[float]  # share of samples leaving at each exit, then at the final head

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else t for t in self.thresholds]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Policy:
        d = dict(d)
        d["thresholds"] = [NEVER if t is None else float(t) for t in d["thresholds"]]
        return cls(**d)


def evaluate_policy(logits: list[torch.Tensor], y: torch.Tensor, costs: list[float], thresholds: list[float],
                    criterion: str, conf: torch.Tensor | None = None,
                    pred: torch.Tensor | None = None) -> tuple[float, float, list[float]]:
    """(accuracy, average cost per sample, share per exit) of `thresholds` on logits of every exit;
    `conf` and `pred` (exits+1 x samples argmax) when the caller tries many thresholds."""
    conf = confidences(logits, criterion) if conf is None else conf
    where = route(conf, thresholds)
    pred = torch.stack([z.argmax(-1) for z in logits]) if pred is None else pred
    chosen = pred.gather(0, where[None])[0]
    acc = float((chosen == y).float().mean())
    counts = torch.bincount(where, minlength=len(logits)).float() / len(y)
    cost = float((counts * torch.tensor(costs, dtype=torch.float)).sum())
    return acc, cost, counts.tolist()


def calibrate(logits: list[torch.Tensor], y: torch.Tensor, costs: list[float], max_acc_drop: float,
              criterion: str = "max_prob", grid: int = 50, passes: int = 3) -> Policy:
    """Per-exit thresholds of the lowest average cost whose accuracy is at least the final head's
    minus `max_acc_drop` points, found by coordinate descent over each exit's confidence quantiles
    (every exit starts closed). `costs[i]`: the cost of a sample that leaves at exit i (the last:
    the final head)."""
    conf = confidences(logits, criterion)
    pred = torch.stack([z.argmax(-1) for z in logits])
    n_exits = conf.shape[0]
    full_acc = float((logits[-1].argmax(-1) == y).float().mean())
    floor = full_acc - max_acc_drop / 100.0 - 1e-9
    qs = torch.linspace(0, 1, grid + 1)
    candidates = [sorted(set(torch.quantile(conf[e], qs).tolist())) + [NEVER] for e in range(n_exits)]
    thresholds = [NEVER] * n_exits
    acc, cost, _ = evaluate_policy(logits, y, costs, thresholds, criterion, conf, pred)
    for _ in range(passes):
        changed = False
        for e in range(n_exits):
            for c in candidates[e]:
                trial = [*thresholds[:e], c, *thresholds[e + 1:]]
                a, k, _ = evaluate_policy(logits, y, costs, trial, criterion, conf, pred)
                if a >= floor and (k < cost - 1e-9 or (abs(k - cost) <= 1e-9 and a > acc)):
                    thresholds, acc, cost, changed = trial, a, k, True
        if not changed:
            break
    acc, cost, fractions = evaluate_policy(logits, y, costs, thresholds, criterion, conf, pred)
    return Policy(criterion, thresholds, acc, full_acc, cost, float(costs[-1]), fractions)


def tradeoff_curve(logits: list[torch.Tensor], y: torch.Tensor, costs: list[float], criterion: str,
                   points: int = 41) -> list[tuple[float, float, float]]:
    """(threshold, average cost, accuracy) with one threshold shared by every exit, from every
    sample leaving at the first exit to none leaving early: the curve of the trade-off plot."""
    conf = confidences(logits, criterion)
    pred = torch.stack([z.argmax(-1) for z in logits])
    out = []
    for t in torch.linspace(float(conf.min()), 1.0, points).tolist() + [NEVER]:
        a, k, _ = evaluate_policy(logits, y, costs, [t] * conf.shape[0], criterion, conf, pred)
        out.append((t, k, a))
    return out

"""Pruning to a latency or size target (`compress.target_latency_ms`, `compress.target_size_bytes`).

Before fine-tuning, the prune stage searches the sparsity: each candidate is the model entering the
stage with that share of its channels removed (the configured structured pruner, one cut), turned
into what ships (ONNX, int8 when the quantize stage follows) and measured there: its latency on
ONNX Runtime with the threads and batch of `eval`, its file size. Bisection finds the lowest
sparsity whose candidate meets the target; the stage then prunes to it on its schedule and
fine-tunes. FLOPs are reported beside latency, and a warning says when they fall while the
measured latency does not (small layers on CPU are bound by per-op overhead, not arithmetic).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from torch import nn

from kdpipe.compress.quantize import CompressionWarning
from kdpipe.errors import build
from kdpipe.export import export_onnx
from kdpipe.metrics.measure import flops_per_sample, onnx_latency_ms

log = logging.getLogger("kdpipe")


@dataclass
class Candidate:
    sparsity: float
    latency_ms: float
    size_bytes: int
    flops: int


class TargetNotReachable(RuntimeError):
    """No sparsity up to the search's maximum meets the target."""


def shipped_form(model: nn.Module, example: torch.Tensor, folder: Path,
                 quantize: Callable[[Path, Path], Path] | None) -> Path:
    """The ONNX file a candidate would ship as: fp32, or int8 by `quantize(fp32, out)`."""
    fp32 = export_onnx(model, example, folder / "candidate.fp32.onnx")
    return quantize(fp32, folder / "candidate.int8.onnx") if quantize else fp32


def measure(model: nn.Module, pruner_cfg, sparsity: float, example: torch.Tensor,
            quantize: Callable[[Path, Path], Path] | None, warmup: int, iters: int, batch_size: int,
            threads: int, **pruner_kwargs) -> Candidate:
    """Prune a copy of `model` to `sparsity` in one cut and measure what it would ship as."""
    trial = copy.deepcopy(model)
    if sparsity > 0:
        pruner = build(pruner_cfg, "prune.pruner", model=trial, example_inputs=example, **pruner_kwargs)
        pruner.step(float(sparsity))
    trial.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = shipped_form(trial, example, Path(tmp), quantize)
        lat = onnx_latency_ms(path, example, warmup=warmup, iters=iters, batch_size=batch_size,
                              threads=threads)
        size = path.stat().st_size
    return Candidate(float(sparsity), lat["p50_ms"], int(size), int(flops_per_sample(trial, example)))


def search_sparsity(measure_at: Callable[[float], Candidate], meets: Callable[[Candidate], bool],
                    max_sparsity: float = 0.9, steps: int = 6) -> tuple[Candidate, list[Candidate]]:
    """The lowest sparsity in [0, max_sparsity] whose candidate `meets` the target, by bisection
    (`steps` halvings after the two ends); every candidate measured is returned too, and logged as
    `target/*` metrics with step = the order measured."""
    tried: list[Candidate] = []

    def at(s: float) -> Candidate:
        c = measure_at(s)
        tried.append(c)
        mlflow.log_metrics({"target/sparsity": c.sparsity, "target/latency_ms": c.latency_ms,
                            "target/size_bytes": float(c.size_bytes), "target/flops": float(c.flops)},
                           step=len(tried) - 1)
        log.info("target: sparsity %.3f -> %.4f ms, %d bytes, %.2f MFLOPs: %s", c.sparsity, c.latency_ms,
                 c.size_bytes, c.flops / 1e6, "meets" if meets(c) else "misses")
        return c

    low = at(0.0)
    if meets(low):
        return low, tried
    high = at(max_sparsity)
    if not meets(high):
        raise TargetNotReachable(f"even at sparsity {max_sparsity:g} the candidate runs in "
                                 f"{high.latency_ms:.4f} ms and holds {high.size_bytes} bytes (unpruned: "
                                 f"{low.latency_ms:.4f} ms, {low.size_bytes} bytes)")
    lo, hi = 0.0, high
    for _ in range(steps):
        mid = at((lo + hi.sparsity) / 2)
        if meets(mid):
            hi = mid
        else:
            lo = mid.sparsity
    return hi, tried


def warn_if_flops_fall_but_latency_does_not(base: Candidate, chosen: Candidate) -> str | None:
    """A warning (and its text) when pruning cut FLOPs by 30 % or more but latency by under 10 %."""
    flops = chosen.flops / max(base.flops, 1)
    latency = chosen.latency_ms / max(base.latency_ms, 1e-12)
    if flops <= 0.7 and latency >= 0.9:
        text = (f"pruning to sparsity {chosen.sparsity:.2f} cut FLOPs to {flops:.0%} of the unpruned model "
                f"but its measured latency only to {latency:.0%}: on this CPU the layers are small enough "
                f"that per-op overhead, not arithmetic, sets the time; round channels to what the runtime "
                f"runs fast (prune.pruner.round_to=8) or target size instead")
        warnings.warn(text, CompressionWarning, stacklevel=2)
        return text
    return None

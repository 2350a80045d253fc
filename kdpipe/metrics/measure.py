"""How each number in `model/*` and `latency/*` is measured."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from kdpipe.losses.token import token_rows


def flops_per_sample(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on one sample, counted by `torch.utils.flop_counter`
    (a multiply-accumulate counts as 2 FLOPs; convolutions and matmuls only)."""
    model = model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example[:1])
    return int(counter.get_total_flops())


def torch_logits(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs on every batch and the targets; a language model's as one row per real
    token (kdpipe.losses.token_rows), so accuracy is next-token accuracy."""
    model = model.eval()
    outs, targets = [], []
    with torch.no_grad():
        for x, y in loader:
            out, y = token_rows(model(x), y)
            outs.append(out)
            targets.append(y)
    return torch.cat(outs), torch.cat(targets)


def ort_session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_logits(path: str | Path, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an ONNX model (fp32 or int8) on every batch with ONNX Runtime (rows as `torch_logits`)."""
    session = ort_session(path, threads=0)
    name = session.get_inputs()[0].name
    outs, targets = [], []
    for x, y in loader:
        out, y = token_rows(torch.from_numpy(session.run(None, {name: x.numpy()})[0]), y)
        outs.append(out)
        targets.append(y)
    return torch.cat(outs), torch.cat(targets)


def onnx_latency_ms(path: str | Path, example: torch.Tensor, warmup: int = 20, iters: int = 200,
                    batch_size: int = 1, threads: int = 1) -> dict[str, float]:
    """Wall-clock latency of one ONNX Runtime call at `batch_size` on `threads` CPU threads,
    after `warmup` calls: p50 and p90 in milliseconds, and throughput in samples/s."""
    session = ort_session(path, threads=threads)
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(example[:1].repeat(batch_size, *([1] * (example.dim() - 1))).numpy())
    for _ in range(warmup):
        session.run(None, {name: x})
    times = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times[i] = time.perf_counter() - t0
    p50, p90 = np.percentile(times, [50, 90]) * 1e3
    return {"p50_ms": float(p50), "p90_ms": float(p90), "throughput": float(batch_size / np.median(times))}

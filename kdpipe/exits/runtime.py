"""An early-exit network as it ships: one ONNX file per segment (fp32, or int8 with each segment
statically quantized) and `policy.json`, run by `ExitRuntime` on ONNX Runtime. A sample that leaves
at exit i never runs segment i+1: the later segments are separate sessions that are not called.

    from kdpipe.exits import ExitRuntime
    rt = ExitRuntime.load("model_exits")        # the folder logged with the pipeline run
    logits, exit_index = rt(images)             # float32 NCHW array
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.compress.quantize import quantize_static_int8
from kdpipe.exits.model import EarlyExitNet
from kdpipe.exits.policy import NEVER, Policy, confidence
from kdpipe.export import INPUT_NAME, export_onnx
from kdpipe.metrics.measure import flops_per_sample, ort_session

POLICY_FILE = "policy.json"


def segment_inputs(net: EarlyExitNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every segment for the batch `x` (the first is `x` itself)."""
    inputs = [x]
    with torch.no_grad():
        for i in range(len(net.exits)):
            x = net.segment(i).eval()(x)[0]
            inputs.append(x)
    return inputs


def segment_costs(net: EarlyExitNet, example: torch.Tensor) -> list[float]:
    """FLOPs per sample of leaving at each exit (every segment and head up to it), then of the
    final head (every segment and every exit head, since each exit is tried on the way)."""
    per = [flops_per_sample(net.segment(i), x) for i, x in enumerate(segment_inputs(net, example[:1]))]
    return [float(sum(per[:i + 1])) for i in range(len(per))]


def export_segments(net: EarlyExitNet, example: torch.Tensor, folder: Path) -> list[Path]:
    """One fp32 ONNX file per segment: `segment_<i>.onnx` with outputs `features` and `logits`
    (the last: `logits` only)."""
    net = net.eval()
    files = []
    for i, x in enumerate(segment_inputs(net, example)):
        names = ("features", "logits") if i < len(net.exits) else ("logits",)
        files.append(export_onnx(net.segment(i), x, folder / f"segment_{i}.onnx", names))
    return files


def quantize_segments(net: EarlyExitNet, files: list[Path], images: list[torch.Tensor], folder: Path,
                      method: str = "minmax", per_channel: bool = True) -> list[Path]:
    """Each segment quantized statically (int8), calibrated on what reaches it: the calibration
    images passed through the segments before it."""
    inputs = [segment_inputs(net.eval(), x) for x in images]
    out = []
    for i, f in enumerate(files):
        batches = [{INPUT_NAME: ins[i].numpy()} for ins in inputs]
        path, _ = quantize_static_int8(f, folder / f"segment_{i}.int8.onnx", None, 0, method, per_channel,
                                       min_samples=0, batches=batches)
        out.append(path)
    return out


def save_package(folder: Path, files: list[Path], policy: Policy) -> Path:
    """`policy.json` beside the segment files: what `ExitRuntime.load` reads."""
    spec = {"segments": [Path(f).name for f in files], "input": INPUT_NAME, **policy.to_dict()}
    path = folder / POLICY_FILE
    path.write_text(json.dumps(spec, indent=2))
    return path


class ExitRuntime:
    """Runs the segments in order on ONNX Runtime; after segment i (i < exits) the samples whose
    confidence reaches threshold i leave with exit i's logits, and only the others go on.
    `segments_run` counts the segment calls."""

    def __init__(self, files: list[Path], thresholds: list[float] | None = None, criterion: str = "max_prob",
                 threads: int = 1) -> None:
        self.sessions = [ort_session(f, threads=threads) for f in files]
        self.thresholds = list(thresholds) if thresholds is not None else [NEVER] * (len(files) - 1)
        if len(self.thresholds) != len(files) - 1:
            raise ValueError(f"{len(files)} segments need {len(files) - 1} thresholds, "
                             f"got {len(self.thresholds)}")
        self.criterion = criterion
        self.segments_run = 0

    @classmethod
    def load(cls, folder: str | Path, threads: int = 1) -> ExitRuntime:
        folder = Path(folder)
        spec = json.loads((folder / POLICY_FILE).read_text())
        policy = Policy.from_dict({k: spec[k] for k in Policy.__dataclass_fields__})
        return cls([folder / s for s in spec["segments"]], policy.thresholds, policy.criterion, threads)

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        """Every exit's logits and the final logits for the whole batch (nothing leaves)."""
        outs = []
        for sess in self.sessions:
            res = sess.run(None, {INPUT_NAME: x})
            self.segments_run += 1
            outs.append(res[-1])
            x = res[0]
        return outs

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, the exit each sample left at; len(thresholds) = the final head)."""
        n = x.shape[0]
        if n == 1:  # one sample, as a device runs it: no bookkeeping between the calls
            for i, sess in enumerate(self.sessions):
                res = sess.run(None, {INPUT_NAME: x})
                self.segments_run += 1
                if i == len(self.thresholds) or confidence(res[-1], self.criterion)[0] >= self.thresholds[i]:
                    return res[-1], np.array([i])
                x = res[0]
        logits: np.ndarray | None = None
        where = np.full(n, len(self.thresholds), dtype=np.int64)
        active = np.arange(n)
        for i, sess in enumerate(self.sessions):
            res = sess.run(None, {INPUT_NAME: x})
            self.segments_run += 1
            z = res[-1]
            if logits is None:
                logits = np.empty((n, z.shape[-1]), dtype=z.dtype)
            if i == len(self.thresholds):
                logits[active] = z
                break
            leave = confidence(z, self.criterion) >= self.thresholds[i]
            logits[active[leave]] = z[leave]
            where[active[leave]] = i
            if leave.all():
                break
            active, x = active[~leave], np.ascontiguousarray(res[0][~leave])
        return logits, where


def all_logits(rt: ExitRuntime, loader) -> tuple[list[torch.Tensor], torch.Tensor]:
    outs, ys = [], []
    for x, y in loader:
        outs.append(rt.run_all(x.numpy()))
        ys.append(y)
    return [torch.from_numpy(np.concatenate(z)) for z in zip(*outs, strict=True)], torch.cat(ys)


def batch1_latency(full_onnx: Path, rt: ExitRuntime, samples: np.ndarray, repeats: int = 5,
                   warmup: int = 20) -> tuple[float, float]:
    """Mean ms per sample at batch 1 of the full-depth model and of the exiting runtime, one thread
    each, on the same samples. Each model takes `repeats` passes over the samples, the two models'
    passes alternating (full, exits, full, exits...), and each sample counts its fastest call of
    each model: a pass runs one model alone, with its weights in cache as on a device that serves
    it; other processes on a shared machine only ever add time, which the minimum leaves out; and
    alternating passes give both models the same conditions."""
    sess = ort_session(full_onnx, threads=1)

    def full(x):
        return sess.run(None, {INPUT_NAME: x})

    batch1 = [np.ascontiguousarray(x[None]) for x in samples]
    best = {full: np.full(len(batch1), np.inf), rt: np.full(len(batch1), np.inf)}
    for run in best:
        for x in batch1[:warmup]:
            run(x)
    for _ in range(repeats):
        for run, times in best.items():
            for i, x in enumerate(batch1):
                t0 = time.perf_counter()
                run(x)
                times[i] = min(times[i], time.perf_counter() - t0)
    return 1e3 * float(best[full].mean()), 1e3 * float(best[rt].mean())

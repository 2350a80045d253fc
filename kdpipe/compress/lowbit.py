"""Weights below int8: grouped int4, binary, and k-means clustered (weight sharing), in one stored form.

Every format is a weight tensor W (out_channels, ...) written as `scales[g] * levels[idx]`:
b-bit indices `idx` packed into bytes, a short table `levels` of 2^b values, and one scale per
group of `group_size` consecutive weights of a row (an output channel). So a layer costs
n * b / 8 bytes of indices plus 4 * (2^b + groups) bytes, and `model/size_bytes` shows it.

- `int4`: symmetric 4-bit integers, levels -8..7, one scale per `group_size` weights of a row
  (max |w| / 7), as in GPTQ/AWQ-style weight-only formats.
- `binary`: levels {-1, +1}, one scale per output channel, the mean |w| of the channel (XNOR-Net,
  Rastegari et al. 2016); trained with a straight-through estimator on latent fp32 weights
  (BinaryConnect, Courbariaux et al. 2015).
- `kmeans`: 2^b shared values per layer from 1-D k-means of its weights, initialised linearly
  between min and max (Han et al. 2016, "Deep Compression", sec. 3); fine-tuning then trains the
  centroids (each gets the summed gradient of the weights that share it) with the indices fixed.

No CPU runtime here executes these formats natively: ONNX Runtime's 4-bit kernel (MatMulNBits)
covers MatMul only, not Conv. The file stores the packed form (that is what the size measures),
and loading decodes it to float32 weights, which run as any fp32 model does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from kdpipe.compress.prune import PRUNABLE

FORMATS = ("int4", "binary", "kmeans")


# -- packing ----------------------------------------------------------------------------------------
def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2**bits, `bits` bits each, packed into uint8 bytes."""
    planes = (idx.reshape(-1, 1).long() >> torch.arange(bits)) & 1
    return torch.from_numpy(np.packbits(planes.numpy().astype(np.uint8).reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    planes = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits).astype(np.int64)
    return torch.from_numpy((planes << np.arange(bits)).sum(1))


# -- encoding -------------------------------------------------------------------------------------------
def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means on scalars, centroids initialised evenly between min and max (the
    initialisation Han et al. found best: it keeps centroids for the rare large weights)."""
    lo, hi = float(values.min()), float(values.max())
    centroids = torch.linspace(lo, hi, k)
    for _ in range(iters):
        assign = (values[:, None] - centroids[None]).abs().argmin(1)
        sums = torch.zeros(k).index_add_(0, assign, values)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones_like(values))
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.allclose(moved, centroids):
            break
        centroids = moved
    return centroids


def codes(w: torch.Tensor, fmt: str, group_size: int = 32, bits: int = 4
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(idx (out, row), levels, scales (out or 1, groups), group_size, bits) of a weight tensor."""
    w = w.detach().float()
    rows = w.reshape(w.shape[0], -1)
    row = rows.shape[1]
    if fmt == "int4":
        groups = math.ceil(row / group_size)
        padded = nn.functional.pad(rows, (0, groups * group_size - row))
        padded = padded.reshape(w.shape[0], groups, group_size)
        scales = (padded.abs().amax(-1) / 7.0).clamp_min(1e-12)
        per_weight = scales.repeat_interleave(group_size, dim=1)[:, :row]
        idx = (torch.clamp(torch.round(rows / per_weight), -8, 7) + 8).long()
        return idx, torch.arange(-8, 8, dtype=torch.float32), scales, group_size, 4
    if fmt == "binary":
        scales = rows.abs().mean(1, keepdim=True).clamp_min(1e-12)
        return (rows >= 0).long(), torch.tensor([-1.0, 1.0]), scales, row, 1
    if fmt == "kmeans":
        levels = kmeans_1d(rows.reshape(-1), 2 ** bits)
        idx = (rows.reshape(-1, 1) - levels[None]).abs().argmin(1).reshape(rows.shape)
        return idx, levels, torch.ones(1, 1), rows.numel(), bits
    raise ValueError(f"unknown low-bit format {fmt!r}; use one of {', '.join(FORMATS)}")


def expand(idx: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, group_size: int,
           shape: list[int]) -> torch.Tensor:
    """scales[group] * levels[idx], as a tensor of `shape`."""
    values = levels[idx.reshape(shape[0], -1)]
    if scales.numel() == 1:
        return (values * scales.reshape(())).reshape(shape)
    per_weight = scales.to(values).repeat_interleave(group_size, dim=1)[:, :values.shape[1]]
    return (values * per_weight).reshape(shape)


def entry(idx: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
          shape: list[int]) -> dict:
    """The stored form: indices packed to `bits` bits each, the levels and the scales."""
    return {"shape": list(shape), "bits": bits, "group_size": group_size, "levels": levels.detach().float(),
            "scales": scales.detach().float(), "idx": pack_bits(idx, bits)}


def encode(w: torch.Tensor, fmt: str, bits: int = 4, group_size: int = 32) -> dict:
    idx, levels, scales, group_size, bits = codes(w, fmt, group_size, bits)
    return entry(idx, levels, scales, group_size, bits, list(w.shape))


def decode(stored: dict) -> torch.Tensor:
    """The float32 weight tensor of a stored entry."""
    shape = list(stored["shape"])
    idx = unpack_bits(stored["idx"], int(stored["bits"]), int(np.prod(shape)))
    return expand(idx, stored["levels"], stored["scales"], int(stored["group_size"]), shape)


def stored_bytes(entry: dict) -> int:
    return int(entry["idx"].numel() + 4 * (entry["levels"].numel() + entry["scales"].numel()))


# -- training ---------------------------------------------------------------------------------------------
class STEQuantize(nn.Module):
    """The forward pass sees the decoded low-bit weight, the backward pass goes straight through to
    the latent fp32 weight (int4 and binary)."""

    def __init__(self, fmt: str, group_size: int) -> None:
        super().__init__()
        self.fmt, self.group_size = fmt, group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        idx, levels, scales, group_size, _ = codes(w, self.fmt, self.group_size)
        # q + (w - w) is q exactly (w + (q - w) is not, in floating point), with w's gradient
        return expand(idx, levels, scales, group_size, list(w.shape)).to(w) + (w - w.detach())


class SharedCentroids(nn.Module):
    """Weight sharing: the layer's weight is `centroids[idx]`; the centroids are the trained
    parameters and the indices stay fixed (Han et al. 2016, sec. 3.3)."""

    def __init__(self, w: torch.Tensor, bits: int) -> None:
        super().__init__()
        idx, levels, _, _, self.bits = codes(w, "kmeans", bits=bits)
        self.register_buffer("idx", idx.reshape(w.shape))
        self.centroids = nn.Parameter(levels.clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.centroids[self.idx]


def target_layers(model: nn.Module, skip_first_last: bool) -> list[str]:
    """The conv/linear layers to store below int8; the first and the last may stay fp32 (the usual
    choice for binary networks: they hold few weights and most of the accuracy)."""
    paths = [p for p, m in model.named_modules() if isinstance(m, PRUNABLE)]
    return paths[1:-1] if skip_first_last and len(paths) > 2 else paths


def attach(model: nn.Module, layers: list[str], fmt: str, bits: int, group_size: int) -> None:
    """Parametrize the layers' weights for training in the low-bit format."""
    modules = dict(model.named_modules())
    for path in layers:
        module = modules[path]
        hook = SharedCentroids(module.weight, bits) if fmt == "kmeans" else STEQuantize(fmt, group_size)
        parametrize.register_parametrization(module, "weight", hook)


def detach(model: nn.Module) -> None:
    """Leave the decoded low-bit weights in place as plain parameters."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def pack_model(model: nn.Module, layers: list[str], fmt: str, bits: int, group_size: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Store the attached layers exactly as the forward pass sees them, then `detach`: returns (the
    state dict without those weights, their stored entries)."""
    modules = dict(model.named_modules())
    packed = {}
    for path in layers:
        module = modules[path]
        hook = module.parametrizations.weight[0]
        shape = list(module.weight.shape)
        if isinstance(hook, SharedCentroids):
            stored = entry(hook.idx, hook.centroids, torch.ones(1, 1), module.weight.numel(), hook.bits,
                           shape)
        else:
            stored = encode(module.parametrizations.weight.original, fmt, bits, group_size)
        packed[f"{path}.weight"] = stored
    detach(model)
    state = {k: v for k, v in model.state_dict().items() if k not in packed}
    return state, packed


def unpack_state_dict(dense: dict[str, torch.Tensor], packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {**dense, **{name: decode(entry) for name, entry in packed.items()}}

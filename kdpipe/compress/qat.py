"""Quantization-aware fine-tuning with fake quantization (Jacob et al. 2018, sec. 3: simulate
the int8 rounding in the forward pass, let gradients pass straight through it, eq. 12-13).

The fake-quant ops are torch's own `fake_quantize_per_channel_affine` and
`fake_quantize_per_tensor_affine` (not the deprecated `torch.ao.quantization` workflow); they
mirror what ONNX Runtime's static int8 conversion does afterwards: symmetric per-channel int8
weights and affine per-tensor uint8 activations at the input of every conv / linear layer.
The callback attaches them for a few epochs of training; `detach` leaves weights that are
exactly representable in int8, which ORT then converts with a calibration pass.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize

from kdpipe.compress.prune import PRUNABLE


class FakeQuantWeight(nn.Module):
    """Symmetric per-output-channel int8: scale = max|w| / 127, zero point 0."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        scale = (w.detach().abs().amax(dim=dims) / 127.0).clamp_min(1e-8).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


class FakeQuantActivation(nn.Module):
    """Affine per-tensor uint8 on an activation, its range tracked by an exponential moving
    average of the batch min/max during training (Jacob et al. 2018, sec. 3.1)."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lo, hi = x.detach().min().clamp(max=0.0), x.detach().max().clamp(min=0.0)
            if not bool(self.seen):
                self.lo.copy_(lo)
                self.hi.copy_(hi)
                self.seen.fill_(True)
            else:
                self.lo.lerp_(lo, self.momentum)
                self.hi.lerp_(hi, self.momentum)
        scale = float((self.hi - self.lo).clamp_min(1e-8) / 255.0)
        zero = int(torch.clamp(torch.round(-self.lo / scale), 0, 255))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


class FakeQuantCallback(Callback):
    """Attaches fake quantization to `model` when fitting starts (`setup`, before the optimizer
    is built; the weight parameter objects stay the same) and keeps it until `detach`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.observers: dict[str, FakeQuantActivation] = {}
        self._handles = []

    def attach(self) -> None:
        if self._handles:
            return
        for path, module in self.model.named_modules():
            if isinstance(module, PRUNABLE):
                parametrize.register_parametrization(module, "weight", FakeQuantWeight())
                observer = FakeQuantActivation()
                self.observers[path] = observer
                self._handles.append(module.register_forward_pre_hook(
                    lambda _m, args, obs=observer: (obs.train(_m.training)(args[0]), *args[1:])))

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self.attach()

    def detach(self) -> None:
        """Remove the fake quantization, leaving the int8-representable weights in place."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for module in self.model.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

"""int8 quantization with ONNX Runtime's quantization tools (the maintained path on CPU;
`torch.ao.quantization` announces its removal), and ORT is where the int8 model runs fast here.

- dynamic: int8 weights in the file, activations quantized on the fly from their observed
  range (no calibration data). Only the op types in `op_types` are quantized: ORT's dynamic
  Conv (ConvInteger) runs slower than fp32 Conv on CPU, so the default is MatMul/Gemm only.
- static: int8 weights per output channel and int8 activations whose ranges come from a
  calibration set (Jacob et al. 2018, "Quantization and Training of Neural Networks for
  Efficient Integer-Arithmetic-Only Inference", eq. 1: r = S (q - Z)), run as QLinearConv /
  QLinearMatMul kernels.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from kdpipe.faults import stop_if_terminated

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}


class CompressionWarning(UserWarning):
    """A compression setting that works but is likely to cost accuracy."""


def _quiet() -> None:
    logging.getLogger("root").setLevel(logging.ERROR)


def quantize_dynamic_int8(fp32_onnx: str | Path, out_path: str | Path, per_channel: bool = False,
                          op_types: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> Path:
    """Post-training dynamic quantization of the given op types (all supported ones if None); the
    ONNX nodes named in `exclude` stay fp32."""
    out_path = Path(out_path)
    _quiet()
    quantize_dynamic(str(fp32_onnx), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=list(op_types) if op_types else None,
                     nodes_to_exclude=list(exclude))
    return out_path


class LoaderCalibrationReader(CalibrationDataReader):
    """Feeds the first `num_batches` batches of a DataLoader (the training split) to ORT's
    calibrator, counting the samples it saw."""

    def __init__(self, loader: Iterable, input_name: str, num_batches: int) -> None:
        self._batches = islice(iter(loader), max(int(num_batches), 0))
        self.input_name = input_name
        self.samples = 0

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        x = x.float() if x.is_floating_point() else x  # token ids stay int64
        self.samples += int(x.shape[0])
        return {self.input_name: x.numpy()}


def check_calibration_size(samples: int, min_samples: int) -> None:
    """Refuse to quantize with no calibration data (activation ranges would be undefined);
    warn below `min_samples`, where the ranges come from too few images to be trusted."""
    if samples <= 0:
        raise ValueError("static quantization got no calibration samples: the training split is empty or "
                         "quantize.calibration.num_batches=0; give it at least one batch (e.g. 8)")
    if samples < min_samples:
        warnings.warn(
            f"calibrating int8 activation ranges on only {samples} samples "
            "(< quantize.calibration.min_samples="
            f"{min_samples}): ranges may be off and accuracy drop; raise quantize.calibration.num_batches",
            CompressionWarning, stacklevel=2)


def read_calibration(loader: Iterable, fp32_onnx: str | Path, num_batches: int,
                     min_samples: int = 256) -> tuple[list[dict], int]:
    """The first `num_batches` training batches as ORT feeds, read once (a search over which layers
    stay fp32 calibrates every candidate on the same images); refused when empty, warned when few."""
    input_name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name
    reader = LoaderCalibrationReader(loader, input_name, num_batches)
    batches = []
    while (item := reader.get_next()) is not None:
        stop_if_terminated()
        batches.append(item)
    check_calibration_size(reader.samples, min_samples)
    return batches, reader.samples


def quantize_static_int8(fp32_onnx: str | Path, out_path: str | Path, loader: Iterable, num_batches: int,
                         method: str = "minmax", per_channel: bool = True, min_samples: int = 256,
                         op_types: Iterable[str] | None = None, exclude: Iterable[str] = (),
                         batches: list[dict] | None = None) -> tuple[Path, int]:
    """Post-training static quantization (QOperator format: QLinearConv etc., per-channel int8
    weights, uint8 activations) calibrated on `num_batches` batches of `loader` (or on `batches`
    from `read_calibration`); the ONNX nodes named in `exclude` stay fp32. Returns (path, samples)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"quantize.calibration.method={method!r}; "
                         f"use one of {', '.join(CALIBRATION_METHODS)}")
    out_path = Path(out_path)
    _quiet()
    if batches is None:  # read first, so that an empty set is refused before ORT runs
        batches, _ = read_calibration(loader, fp32_onnx, num_batches, min_samples)
    replay = iter(batches)

    class _Replay(CalibrationDataReader):
        def get_next(self) -> dict | None:
            return next(replay, None)

    quantize_static(str(fp32_onnx), str(out_path), _Replay(), quant_format=QuantFormat.QOperator,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CALIBRATION_METHODS[method],
                    op_types_to_quantize=list(op_types) if op_types else None,
                    nodes_to_exclude=list(exclude))
    return out_path, sum(next(iter(b.values())).shape[0] for b in batches)

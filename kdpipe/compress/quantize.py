"""int8 quantization with ONNX Runtime's quantization tools (the maintained path on CPU;
`torch.ao.quantization` announces its removal)."""

from __future__ import annotations

import logging
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic


def quantize_dynamic_int8(fp32_onnx: str | Path, out_path: str | Path, per_channel: bool = False) -> Path:
    """Post-training dynamic quantization: int8 weights stored in the file, activations
    quantized on the fly at run time from their observed range (no calibration data needed)."""
    out_path = Path(out_path)
    logging.getLogger("root").setLevel(logging.ERROR)
    quantize_dynamic(str(fp32_onnx), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel)
    return out_path

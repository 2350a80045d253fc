"""ONNX export with the maintained torch.export-based exporter (`dynamo=True`).

ONNX Runtime is the one runtime every model of a pipeline is timed on (fp32 and int8 alike),
so latency ratios measure compression, not the difference between eager PyTorch and ORT.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Export `model` (eval mode) with a dynamic batch dimension; returns the file path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), optimize=True, verbose=False,
        )
    program.save(str(path))
    return path

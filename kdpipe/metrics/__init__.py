"""Measurements of a model: accuracy, calibration, size, FLOPs and latency."""

from kdpipe.metrics.measure import (
    flops_per_sample,
    onnx_latency_ms,
    onnx_logits,
    ort_session,
    torch_logits,
)

__all__ = ["flops_per_sample", "onnx_latency_ms", "onnx_logits", "ort_session", "torch_logits"]

"""ONNX export with the maintained torch.export-based exporter (`dynamo=True`).

ONNX Runtime is the one runtime every model of a pipeline is timed on (fp32 and int8 alike),
so latency ratios measure compression, not the difference between eager PyTorch and ORT.

An export costs seconds even for a tiny model, so two things are done once per process: the
exporter's op registry is built once (`_cached_torchlib_registry`), and a model exported again
with the same module classes, attributes, weights and example (the quantize stage and the
evaluate stage both export the pruned model) is copied from its first export: the exporter is
deterministic, so the bytes are those a second export would write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# fingerprint of (model, example) -> (file written by the first export, its size and mtime)
_EXPORTED: dict[str, tuple[Path, int, int]] = {}
_REGISTRIES: dict = {}
_PLAIN = (bool, int, float, str, type(None))
# what every nn.Module holds (parameters, buffers, submodules, hooks, the training flag): the
# fingerprint covers these its own way
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module()))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path,
                output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> Path:
    """Export `model` (eval mode) with a dynamic batch dimension; returns the file path. A model
    with several outputs (an early exit's segment: features and logits) names each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    key = fingerprint(model, example)
    if key is not None and output_names != (OUTPUT_NAME,):
        key += ":" + ",".join(output_names)
    if key is not None and _copy_earlier_export(key, path):
        return path
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _cached_torchlib_registry():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), optimize=True, verbose=False,
        )
    program.save(str(path))
    if key is not None:
        st = path.stat()
        _EXPORTED[key] = (path, st.st_size, st.st_mtime_ns)
    return path


def _copy_earlier_export(key: str, path: Path) -> bool:
    """Copy the file an earlier export of the same model wrote, if it is still there unchanged."""
    earlier = _EXPORTED.get(key)
    if earlier is None:
        return False
    src, size, mtime = earlier
    try:
        st = src.stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return False
        if src.resolve() != path.resolve():
            shutil.copyfile(src, path)
    except OSError:
        return False
    return True


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _tensor_bytes(h, label: str, t: torch.Tensor | None) -> None:
    if t is None:
        h.update(f"{label}:None".encode())
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{label}:{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(model: nn.Module, example: torch.Tensor) -> str | None:
    """A hash of everything an export of `model` on `example` depends on: each submodule's
    class and own attributes (sizes, strides, a temperature...), every parameter and buffer,
    and the example. None (export afresh) when a module holds anything else (forward hooks,
    tensors or objects beside its parameters and buffers) that could change what it computes."""
    from torch.nn.modules import module as module_mod

    if any(getattr(module_mod, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return None
    h = hashlib.sha256()
    _tensor_bytes(h, "example", example)
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return None
        attrs = []
        for attr, value in sorted(vars(module).items()):
            if attr in _MODULE_BOOKKEEPING:
                continue
            if not _plain(value):
                return None
            attrs.append((attr, value))
        cls = type(module)
        h.update(repr((name, f"{cls.__module__}.{cls.__qualname__}", attrs)).encode())
        for tname, t in module._parameters.items():
            _tensor_bytes(h, f"p:{tname}", t)
        for tname, t in module._buffers.items():
            _tensor_bytes(h, f"b:{tname}", t)
    return h.hexdigest()


@contextlib.contextmanager
def _cached_torchlib_registry() -> Iterator[None]:
    """torch.onnx builds its op registry from onnxscript's torchlib on every export, parsing the
    source of ~500 functions (about 1 s of each export on 2 CPU cores); the registry depends only
    on the opset, and export does not change it, so build it once per process. Only while our
    own export runs (it passes no custom ops); should torch's internals move, export as usual."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_cls = _registration.ONNXRegistry
        original = registry_cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    registry_cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_cls.from_torchlib = original

"""The on-disk format of a torch model artefact.

A model file is a plain dict `{"format", "arch", "state_dict"}` saved with `torch.save` and read
back with `torch.load(weights_only=True)`: no pickled code is ever executed on load, and the
architecture is rebuilt from its config (`arch` holds the `_target_` and its arguments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

FORMAT = "kdpipe-torch/1"


def save_model(model: nn.Module, arch: dict[str, Any], path: str | Path,
               state_dict: dict[str, torch.Tensor] | None = None, **extra: Any) -> Path:
    """Save weights plus the config that rebuilds the architecture. `extra` entries (tensors,
    numbers, strings, lists, dicts) are stored beside them: `sparse` (packed pruned weights,
    see kdpipe/compress/sparse_format.py, with the rest in `state_dict`), `lowbit` (int4, binary
    or clustered weights, kdpipe/compress/lowbit.py) and `structured=True`
    (channels removed: the built model is shrunk to the saved shapes) are understood on load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    torch.save({"format": FORMAT, "arch": arch, "state_dict": state_dict, **extra}, path)
    return path


def read_model_file(path: str | Path) -> dict[str, Any]:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kdpipe model file (expected a dict with format={FORMAT!r})")
    if payload.get("sparse"):
        from kdpipe.compress.sparse_format import unpack_state_dict

        payload["state_dict"] = unpack_state_dict(payload["state_dict"], payload.pop("sparse"))
    if payload.get("lowbit"):
        from kdpipe.compress.lowbit import unpack_state_dict as unpack_lowbit

        payload["state_dict"] = unpack_lowbit(payload["state_dict"], payload.pop("lowbit"))
    return payload


def build_model(arch: dict[str, Any]) -> nn.Module:
    return instantiate(arch, _convert_="all")


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the model saved by `save_model`, in eval mode on the CPU. The throwaway random
    initialisation draws from a forked RNG, so loading a model never shifts the seeded stream that
    the next model built (a student) initialises from."""
    payload = read_model_file(path)
    with torch.random.fork_rng(devices=[]):
        model = build_model(payload["arch"])
    if payload.get("structured"):
        from kdpipe.compress.structured import resize_to_state_dict

        resize_to_state_dict(model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_state_dict_any(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a kdpipe model file, a Lightning checkpoint (`state_dict` with a `model.`
    prefix) or a bare state dict, all read with `weights_only=True`."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return read_model_file(path)["state_dict"]
    if isinstance(payload, dict) and "state_dict" in payload:
        sd = payload["state_dict"]
        if any(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        return sd
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    raise ValueError(f"{path}: not a kdpipe model file, a Lightning checkpoint or a state dict")

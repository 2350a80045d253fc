"""CIFAR-10 and CIFAR-100 in the python-pickle batch format of the official archives.

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009): each batch file is
a pickled dict with `data` (N x 3072 uint8, the 1024 red, then green, then blue values of a
32x32 image, row-major) and `labels` (CIFAR-10) or `fine_labels`/`coarse_labels` (CIFAR-100).
The files are read with a restricted unpickler that builds numpy arrays and plain containers
only: a batch file from an untrusted source cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from kdpipe.data.base import TensorDataModule, file_identity
from kdpipe.data.checks import CIFAR_LAYOUTS, cifar_files, cifar_folder, cifar_layout
from kdpipe.errors import ConfigError

# What the official batch files reference; anything else (os.system, builtins.eval...) is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}

LAYOUTS = CIFAR_LAYOUTS


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only numpy arrays")
        return super().find_class(module, name)


def read_batch(path: str | Path) -> dict[str, object]:
    """One batch file as a dict with str keys (the archives were pickled by Python 2: bytes keys)."""
    with open(path, "rb") as fh:
        raw = _BatchUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a CIFAR batch (a pickled dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def write_batch(images: np.ndarray, labels: np.ndarray, path: str | Path, label_key: str = "labels") -> Path:
    """Write `(N, 3, 32, 32)` uint8 images and their labels as one batch file in the official
    format (protocol 2, bytes keys); used by tests and to convert other data."""
    path = Path(path)
    images = np.asarray(images, dtype=np.uint8)
    batch = {b"batch_label": b"kdpipe", label_key.encode(): [int(v) for v in labels],
             b"data": images.reshape(len(images), -1),
             b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)
    return path


class CIFARDataModule(TensorDataModule):
    """32x32 colour images of CIFAR-10 (`variant=cifar10`) or CIFAR-100 (`variant=cifar100`,
    fine labels). `root` is the extracted archive folder or its parent. The official test split
    is kept; val is drawn from train with the seed; `limit_train` caps the training set."""

    def __init__(self, root: str, variant: str = "cifar10", channels: int = 3, height: int = 32,
                 width: int = 32, num_classes: int = 10, limit_train: int | None = None, **kwargs) -> None:
        super().__init__(channels, height, width, num_classes, **kwargs)
        self.layout = cifar_layout(variant)
        self.variant = variant
        self.root = Path(os.path.expanduser(str(root)))
        self.limit_train = limit_train

    def folder(self) -> Path:
        return cifar_folder(self.root, self.variant)

    def check_files(self) -> dict[str, list[Path]]:
        """The batch files per split (present, not empty), or a ConfigError with the commands
        that get them, every path quoted for the shell."""
        return cifar_files(self.root, self.variant)

    def stats_key(self) -> dict:
        return {"files": file_identity(p for ps in self.check_files().values() for p in ps),
                "limit_train": self.limit_train}

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for split, paths in self.check_files().items():
            xs, ys = [], []
            for path in paths:
                batch = read_batch(path)
                if "data" not in batch or self.layout["labels"] not in batch:
                    raise ConfigError(f"{path} has keys {sorted(batch)}; a {self.variant} batch needs "
                                      f"'data' and '{self.layout['labels']}' (is data.variant right?)")
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[self.layout["labels"]], dtype=np.int64))
            x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
            y = torch.from_numpy(np.concatenate(ys))
            if split == "train" and self.limit_train:
                x, y = x[: self.limit_train], y[: self.limit_train]
            out[split] = (x, y)
        return out

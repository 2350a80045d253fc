"""MNIST-format data (IDX files, gzipped or not): Fashion-MNIST and MNIST.

Format (LeCun et al., "THE MNIST DATABASE"): a big-endian header of magic number
`0x0000 <dtype> <ndim>` and `ndim` uint32 sizes, then the raw array.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from kdpipe.data.base import TensorDataModule, file_identity
from kdpipe.errors import ConfigError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (`.gz` or raw) into a numpy array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path}: header says {shape} of {dtype} ({expected} bytes) "
                         f"but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def write_idx(array: np.ndarray, path: str | Path) -> Path:
    """Write an array as an IDX file (gzipped when the name ends in `.gz`); used by tests
    and by anyone converting their own data to this format."""
    path = Path(path)
    codes = {np.dtype(v).str.lstrip("<>|="): k for k, v in _DTYPES.items()}
    arr = np.asarray(array)
    be = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = codes[np.dtype(arr.dtype).str.lstrip("<>|=")]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(header + be.tobytes())
    return path


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


class IDXDataModule(TensorDataModule):
    """28x28 grey images in IDX files under `root` (the four standard file names, `.gz` or
    not). The official train/test split is kept; val is drawn from train with the seed.
    `limit_train` caps the training set for quick runs."""

    def __init__(self, root: str, install_hint: str = "", channels: int = 1, height: int = 28,
                 width: int = 28, num_classes: int = 10, limit_train: int | None = None, **kwargs) -> None:
        super().__init__(channels, height, width, num_classes, **kwargs)
        self.root = Path(os.path.expanduser(str(root)))
        self.install_hint = install_hint
        self.limit_train = limit_train

    def check_files(self) -> dict[str, tuple[Path, Path]]:
        """The four files, or a ConfigError with the command that gets them."""
        found, missing = {}, []
        for split, (img, lab) in SPLIT_FILES.items():
            paths = (_find(self.root, img), _find(self.root, lab))
            if None in paths:
                missing += [n for n, p in zip((img, lab), paths, strict=True) if p is None]
            found[split] = paths
        if missing:
            hint = f" Get them with: {self.install_hint}" if self.install_hint else ""
            raise ConfigError(f"data.root={self.root} lacks {', '.join(missing)} (.gz or raw).{hint} "
                              f"Or point data.root at a folder that has them.")
        return found

    def stats_key(self) -> dict:
        files = [p for pair in self.check_files().values() for p in pair]
        return {"files": file_identity(files), "limit_train": self.limit_train}

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for split, (img, lab) in self.check_files().items():
            x = torch.from_numpy(read_idx(img).astype(np.float32) / 255.0).unsqueeze(1)
            y = torch.from_numpy(read_idx(lab).astype(np.int64))
            if split == "train" and self.limit_train:
                x, y = x[: self.limit_train], y[: self.limit_train]
            out[split] = (x, y)
        return out

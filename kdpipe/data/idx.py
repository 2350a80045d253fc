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
from kdpipe.data.checks import READ_ERRORS, SPLIT_FILES, check_idx, idx_corrupt, idx_files

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

__all__ = ["SPLIT_FILES", "IDXDataModule", "read_idx", "write_idx"]


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
        return idx_files(self.root, self.install_hint)

    def _read(self, path: Path) -> np.ndarray:
        """`read_idx`, a file that breaks while it is read (changed since it was checked, or
        corrupt inside a gzip stream whose trailer is intact) named in one line."""
        try:
            return read_idx(path)
        except (*READ_ERRORS, ValueError) as exc:
            raise idx_corrupt(path, self.install_hint, why=" ".join(str(exc).split())) from exc

    def stats_key(self) -> dict:
        files = [p for pair in self.check_files().values() for p in pair]
        return {"files": file_identity(files), "limit_train": self.limit_train}

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # The same checks as the command line's (kdpipe.preflight): headers, lengths, counts, labels.
        found = check_idx(self.root, self.install_hint, self.num_classes, self.in_shape)
        out = {}
        for split, (img, lab) in found.items():
            x = torch.from_numpy(self._read(img).astype(np.float32) / 255.0).unsqueeze(1)
            y = torch.from_numpy(self._read(lab).astype(np.int64))
            if split == "train" and self.limit_train:
                x, y = x[: self.limit_train], y[: self.limit_train]
            out[split] = (x, y)
        return out

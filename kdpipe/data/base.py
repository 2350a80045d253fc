"""A data module over in-memory tensors: seeded splits and train-split normalisation.

Small image classification sets (digits, Fashion-MNIST, CIFAR) fit in memory, so one module
serves them all: a subclass only says how to load `(images, labels)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from kdpipe import cache_dir, limits
from kdpipe.errors import ConfigError

# The label of a training image whose label is hidden (`labeled_fraction` < 1): PyTorch's
# `ignore_index`, so cross-entropy skips it and every term that reads labels can mask it.
UNLABELED = -100


def file_identity(paths) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of each file: changes when a file is replaced, so cached statistics
    of the old file are not reused."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    return out


def splits_fingerprint(splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """A hash of every split's images and labels as loaded: part of each stage's cache key, so a
    stage trained on other data is never reused, however the data changed (files replaced,
    class folders swapped, a generator's settings). About 1 s per GB on one core."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(splits):
        for t in splits[name]:
            t = t.contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.numpy().data if t.dtype != torch.bfloat16 else t.float().numpy().data)
    return digest.hexdigest()


# The token of example text inputs: the first id after kdpipe.data.text's special tokens (<pad>,
# <bos>, <eos>, <unk>), so an example is a full-length sequence without padding. In multi-task data
# it is <task0>, the task token a multi-task model reads first.
TEXT_EXAMPLE_TOKEN = 4


def config_example(data, batch: int = 2) -> tuple[tuple[int, ...], torch.Tensor]:
    """(input shape, an example batch) from a `data` config, before any data is read: token ids of
    `max_length` for text data (kdpipe.data.text), zero images of channels x height x width else."""
    if data.get("max_length") is not None:
        length = int(data.max_length)
        return (length,), torch.full((batch, length), TEXT_EXAMPLE_TOKEN, dtype=torch.long)
    shape = (int(data.channels), int(data.height), int(data.width))
    return shape, torch.zeros(batch, *shape)


class BatchTensorDataset(TensorDataset):
    """A loader's view of in-memory tensors that hands over a whole batch at once
    (`__getitems__`, one `index_select` per tensor) instead of one `__getitem__` per sample
    and a `torch.stack` of them: about 5x less time per batch, the same samples in the same
    order. Pair it with `collate_batch`; the data module's own splits stay plain
    TensorDatasets, so any `DataLoader(dm.train_set)` works as before."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [t.index_select(0, index) for t in self.tensors]


def collate_batch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """The collate function for a BatchTensorDataset: its batch comes stacked already (a list,
    as the default collate function gives for tuples of tensors)."""
    return batch


class TensorDataModule(pl.LightningDataModule):
    """Splits `(x, y)` into train/val/test with a seeded permutation and standardises x
    with the mean and std of the training split only (no test-set leakage)."""

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        num_classes: int,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
        augment: list | None = None,
        labeled_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        limits.split_fractions(val_fraction, test_fraction)  # as the command line checks them
        self.labeled_fraction = limits.labeled_fraction(labeled_fraction)
        limits.num_classes(num_classes)
        self.in_shape = (channels, height, width)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.augment = list(augment or [])
        self.train_set: TensorDataset | None = None
        self.labeled_set: TensorDataset | None = None

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return all samples as float images `(N, C, H, W)` and int64 labels `(N,)`."""
        raise TypeError(f"{type(self).__name__} must implement load() or load_splits()")

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Return predefined splits (`train`, `test`, optionally `val`) when the data ships them."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        splits = self.make_splits()
        self._check_shape(splits["train"])
        splits["train"] = self._hide_labels(*splits["train"])
        self.fingerprint = splits_fingerprint(splits)
        self.mean, self.std = self._train_statistics(splits["train"][0])
        self.set_splits({k: ((x - self.mean) / self.std, y) for k, (x, y) in splits.items()})

    def make_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """train/val/test as loaded: the data's own splits (`load_splits`), val drawn from train
        with the seed when it has none; or `load()` split with the seed."""
        splits = self.load_splits()
        gen = torch.Generator().manual_seed(self.seed)
        if splits is None:
            x, y = self.load()
            perm = torch.randperm(len(y), generator=gen)
            n_test = int(round(len(y) * self.test_fraction))
            n_val = int(round(len(y) * self.val_fraction))
            test_idx, val_idx, train_idx = (perm[:n_test], perm[n_test : n_test + n_val],
                                            perm[n_test + n_val :])
            splits = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
                      "test": (x[test_idx], y[test_idx])}
        elif "val" not in splits:
            x, y = splits["train"]
            perm = torch.randperm(len(y), generator=gen)
            n_val = int(round(len(y) * self.val_fraction))
            splits["val"] = (x[perm[:n_val]], y[perm[:n_val]])
            splits["train"] = (x[perm[n_val:]], y[perm[n_val:]])
        return splits

    def set_splits(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The datasets the loaders read, from the splits as the model sees them."""
        self.train_set = TensorDataset(*splits["train"])
        y = splits["train"][1]
        labeled = (y != UNLABELED).reshape(len(y), -1).any(1)  # sequence targets: a row with any label
        self.labeled_set = (self.train_set if bool(labeled.all())
                            else TensorDataset(*(t[labeled] for t in splits["train"])))
        self.val_set = TensorDataset(*splits["val"])
        self.test_set = TensorDataset(*splits["test"])

    def _hide_labels(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hinton's transfer set: keep the labels of a seeded `labeled_fraction` of the training
        images (at least one per class present, so every class is seen) and mark the rest
        `UNLABELED`. The images all stay: distillation reads the teacher's outputs on them."""
        if self.labeled_fraction >= 1.0:
            return x, y
        gen = torch.Generator().manual_seed(self.seed + 1)
        order = torch.randperm(len(y), generator=gen)
        keep = torch.zeros(len(y), dtype=torch.bool)
        keep[order[:max(1, int(round(len(y) * self.labeled_fraction)))]] = True
        for c in torch.unique(y).tolist():  # a class left without any label could never be learnt
            if not keep[y == c].any():
                keep[order[(y[order] == c).nonzero()[0, 0]]] = True
        return x, torch.where(keep, y, torch.full_like(y, UNLABELED))

    def stats_key(self) -> dict | None:
        """What identifies the training split (files, seed, split sizes), so its normalisation
        statistics can be cached on disk; None (the default) means recompute each time, which
        is right for data generated in memory."""
        return None

    def _train_statistics(self, x_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training split only, so nothing of the val/test
        images leaks into the inputs; cached under `$KDPIPE_CACHE_DIR/stats` (default
        `~/.cache/kdpipe/stats`) for data read from files, keyed by `stats_key()`."""
        key = self.stats_key()
        cache = None
        if key is not None:
            blob = json.dumps({"class": type(self).__name__, "key": key, "seed": self.seed,
                               "val_fraction": self.val_fraction, "test_fraction": self.test_fraction},
                              sort_keys=True, default=str)
            cache = cache_dir("stats") / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"
            if cache.is_file():
                saved = json.loads(cache.read_text())
                if len(saved["mean"]) == x_train.shape[1]:
                    self.stats_cached = True
                    return (torch.tensor(saved["mean"]).view(1, -1, 1, 1),
                            torch.tensor(saved["std"]).view(1, -1, 1, 1))
        dims = (0, 2, 3)
        mean = x_train.mean(dim=dims, keepdim=True)
        std = x_train.std(dim=dims, keepdim=True).clamp_min(1e-6)
        self.stats_cached = False
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}))
                os.replace(tmp, cache)  # atomic: a parallel job reads the old file or the new one
            except OSError:  # a read-only home: the statistics are cheap to recompute
                pass
        return mean, std

    def _check_shape(self, split: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = split
        if tuple(x.shape[1:]) != self.in_shape:
            raise ConfigError(
                f"the data has images of shape {tuple(x.shape[1:])} but the config says "
                f"channels/height/width = {self.in_shape}; fix data.channels, data.height, data.width"
            )
        if int(y.max()) >= self.num_classes:
            raise ConfigError(f"the data has labels up to {int(y.max())} "
                              f"but data.num_classes={self.num_classes}")

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.in_shape)

    def _loader(self, ds: TensorDataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        """Batches of `ds`, shuffled in a seeded order or in order. A plain TensorDataset is read a
        batch at a time (BatchTensorDataset): same sampler, same batches, less time."""
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        batched = type(ds) in (TensorDataset, BatchTensorDataset)  # a subclass's own __getitem__ is honoured
        return DataLoader(BatchTensorDataset(*ds.tensors) if batched else ds,
                          batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, generator=gen,
                          collate_fn=collate_batch if batched else None)

    def train_dataloader(self) -> DataLoader:
        """Batches of the labeled training images: what training on hard labels sees (the
        teacher stage, `distill=none`, fine-tuning). All of them unless `labeled_fraction` < 1."""
        return self._loader(self.labeled_set, shuffle=True)

    def transfer_dataloader(self) -> DataLoader:
        """Batches of every training image, labeled or not (label `UNLABELED`): what a student
        distilled from a teacher sees (Hinton et al. 2015's transfer set)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, batch_size=512)

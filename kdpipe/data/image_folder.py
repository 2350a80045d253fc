"""Your own images: one sub-folder per class of image files, read with PIL.

The layout torchvision's `ImageFolder` made the convention: `root/<class>/<image>`, or with
predefined splits `root/train/<class>/...` plus optional `root/val/...` and `root/test/...`.
Class indices follow the sorted folder names of the training split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdpipe.data.base import TensorDataModule, file_identity
from kdpipe.data.checks import (
    IMAGE_SUFFIXES,
    check_image_folder,
    list_classes,
    list_images,
    unreadable_image,
)
from kdpipe.errors import ConfigError

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataModule", "list_classes", "list_images"]


class ImageFolderDataModule(TensorDataModule):
    """Images resized to the declared `height` x `width` (bilinear) and converted to grey
    (`channels=1`) or RGB (`channels=3`). Without `train/`, the whole folder is split into
    train/val/test with the seed; with `train/` but no `val/` (or `test/`), val (or test) is
    drawn from train with the seed."""

    def __init__(self, root: str | None, channels: int = 3, height: int = 32, width: int = 32,
                 num_classes: int = 2, **kwargs) -> None:
        super().__init__(channels, height, width, num_classes, **kwargs)
        if not root:
            raise ConfigError("data=image_folder needs data.root=/path/to/images (one sub-folder per class)")
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels}: image_folder reads grey (1) or RGB (3) images")
        self.root = Path(os.path.expanduser(str(root)))

    def layout(self) -> dict[str, list[tuple[Path, int]]]:
        """The image files of each split found on disk (`all` when there are no split folders),
        checked as the command line checks them (kdpipe.preflight): at least two class folders,
        as many as `num_classes`, images in every split, the first image of each class readable."""
        self.classes, found = check_image_folder(self.root, self.num_classes)
        return found

    def read(self, items: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        mode = "L" if self.in_shape[0] == 1 else "RGB"
        size = (self.in_shape[2], self.in_shape[1])  # PIL wants (width, height)
        arrays = []
        for path, _ in items:
            try:
                with Image.open(path) as img:
                    arrays.append(np.asarray(img.convert(mode).resize(size, Image.BILINEAR), dtype=np.uint8))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise unreadable_image(path, exc) from exc
        x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)
        x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.tensor([label for _, label in items], dtype=torch.long)

    def stats_key(self) -> dict:
        found = self.layout()
        return {"files": {split: file_identity(p for p, _ in items) for split, items in found.items()},
                "shape": list(self.in_shape)}

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read(self.layout()["all"])

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        found = self.layout()
        if "all" in found:
            return None
        splits = {split: self.read(items) for split, items in found.items()}
        if "test" not in splits:  # carve test out of train with the seed; val follows in setup
            x, y = splits["train"]
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed + 1))
            n_test = int(round(len(y) * self.test_fraction))
            splits["test"] = (x[perm[:n_test]], y[perm[:n_test]])
            splits["train"] = (x[perm[n_test:]], y[perm[n_test:]])
        return splits

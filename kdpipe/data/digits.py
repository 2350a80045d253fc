"""The 8x8 handwritten digits that scikit-learn ships: the default data, no download."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from kdpipe.data.base import TensorDataModule


class DigitsDataModule(TensorDataModule):
    """1,797 grey 8x8 images of the digits 0-9 (UCI optical recognition set)."""

    def __init__(self, channels: int = 1, height: int = 8, width: int = 8, num_classes: int = 10,
                 **kwargs) -> None:
        super().__init__(channels, height, width, num_classes, **kwargs)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return x, torch.tensor(digits.target, dtype=torch.long)

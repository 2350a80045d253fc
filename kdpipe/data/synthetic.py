"""Random images with a learnable class structure, for tests and smoke runs."""

from __future__ import annotations

import torch

from kdpipe.data.base import TensorDataModule


class SyntheticDataModule(TensorDataModule):
    """Each class has a random prototype image; samples are the prototype plus Gaussian noise
    (`noise` controls how hard the task is), so a model can learn it and beat chance."""

    def __init__(self, channels: int = 1, height: int = 8, width: int = 8, num_classes: int = 4,
                 num_samples: int = 512, noise: float = 1.0, **kwargs) -> None:
        super().__init__(channels, height, width, num_classes, **kwargs)
        self.num_samples = num_samples
        self.noise = noise

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1234 + self.seed)
        prototypes = torch.randn(self.num_classes, *self.in_shape, generator=gen)
        y = torch.randint(0, self.num_classes, (self.num_samples,), generator=gen)
        x = prototypes[y] + self.noise * torch.randn(self.num_samples, *self.in_shape, generator=gen)
        return x, y

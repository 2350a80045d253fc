"""Batch augmentation on the device (kornia), declared in config as `data.augment`.

Applied in the LightningModule's `on_after_batch_transfer`, i.e. once per batch after it reaches
the device and before the training step, so teacher and student see the same augmented view
(a teacher run on another random view would give targets for an image the student never saw).
Only training batches are augmented; validation and test see the data as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from kdpipe.errors import ConfigError

KNOWN = ("crop", "flip", "rotate", "jitter")


def _entries(spec: Sequence[Any]) -> list[tuple[str, dict]]:
    """`[crop, {rotate: {degrees: 15}}]` -> `[("crop", {}), ("rotate", {"degrees": 15})]`."""
    out = []
    for item in spec:
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, Mapping) and len(item) == 1:
            name, kwargs = next(iter(item.items()))
            kwargs = dict(kwargs or {})
        else:
            raise ConfigError(f"data.augment entry {item!r} must be a name or {{name: {{options}}}}; "
                              f"names: {', '.join(KNOWN)}")
        if name not in KNOWN:
            raise ConfigError(f"data.augment: unknown augmentation {name!r}; choose from {', '.join(KNOWN)}")
        out.append((name, kwargs))
    return out


def build_augmentation(spec: Sequence[Any] | None, in_shape: Sequence[int]) -> nn.Module | None:
    """The kornia pipeline for `data.augment`, or None when it is empty.

    - `crop`: random crop back to the input size after zero padding (`padding`, default 1/8 of
      the side, i.e. the 4 pixels of 32x32 CIFAR training);
    - `flip`: horizontal flip with probability `p` (0.5);
    - `rotate`: rotation by up to `degrees` (10);
    - `jitter`: brightness and contrast (`strength` 0.2), which apply to any number of channels.
      Data are standardised, so outputs are not clipped to [0, 1]; kornia's saturation and hue
      clip, so they are left out.
    """
    if not spec:
        return None
    import kornia.augmentation as K  # here, not at the top: ~0.2 s of import a run without augmentation skips

    _, height, width = (int(v) for v in in_shape)
    ops: list[nn.Module] = []
    for name, kw in _entries(spec):
        try:
            if name == "crop":
                pad = int(kw.pop("padding", max(1, min(height, width) // 8)))
                ops.append(K.RandomCrop((height, width), padding=pad, **kw))
            elif name == "flip":
                ops.append(K.RandomHorizontalFlip(**kw))
            elif name == "rotate":
                ops.append(K.RandomRotation(degrees=float(kw.pop("degrees", 10.0)), **kw))
            else:
                s = float(kw.pop("strength", 0.2))
                ops.append(K.RandomBrightness((1 - s, 1 + s), clip_output=False, **kw))
                ops.append(K.RandomContrast((1 - s, 1 + s), clip_output=False, **kw))
        except TypeError as exc:
            raise ConfigError(f"data.augment {name}: {exc}") from exc
    return K.AugmentationSequential(*ops)

"""Batch augmentation on the device (kornia), declared in config as `data.augment`.

Applied in the LightningModule's `on_after_batch_transfer`, i.e. once per batch after it reaches
the device and before the training step, so teacher and student see the same augmented view
(a teacher run on another random view would give targets for an image the student never saw).
Only training batches are augmented; validation and test see the data as it is.

`mixup` and `cutmix` (last in the list) also mix the labels: the batch's labels become rows of
class probabilities, which the cross-entropy term reads as they are. With a teacher this is
Beyer et al. (2022)'s "consistent" function matching: the teacher scores the very mixed image
the student sees, so its logits are computed live, never taken from the cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import ConfigError

KNOWN = ("crop", "flip", "rotate", "jitter", "mixup", "cutmix")
MIXES = ("mixup", "cutmix")


class BatchAugment(nn.Module):
    """`data.augment` as one module: `forward(x, y) -> (x, y)`. The geometric and photometric
    ops (kornia's AugmentationSequential) change the images only; a mix (kornia's RandomMixUpV2
    or RandomCutMixV2, last) also returns mixed labels as class probabilities: `(1 - lam)` on
    the image's own label and `lam` on the one mixed in. An unlabeled image's label row is zero."""

    def __init__(self, ops: nn.Module | None, mix: nn.Module | None, num_classes: int | None,
                 lam_is_own_share: bool = False) -> None:
        super().__init__()
        self.ops, self.mix, self.num_classes = ops, mix, num_classes
        self.lam_is_own_share = lam_is_own_share

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        if self.ops is not None:
            x = self.ops(x)
        if self.mix is None or y is None:
            return x if y is None else (x, y)
        x, mixed = self.mix(x, y.float())
        mixed = mixed.reshape(-1, len(x), 3)  # cutmix gives one (own, other, lam) row per mix
        soft = onehot(y, self.num_classes)
        for m in mixed:  # columns: own label, the other image's label, a share
            other, lam = m[:, 1].long(), m[:, 2, None]
            if self.lam_is_own_share:
                lam = 1 - lam
            soft = (1 - lam) * soft + lam * onehot(other, self.num_classes)
        return x, soft


def onehot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows of class probabilities; a row of a hidden label (negative) is zero."""
    if y.dtype.is_floating_point:
        return y
    known = y >= 0
    return F.one_hot(y.clamp_min(0), num_classes).float() * known[:, None]


def _entries(spec: Sequence[Any], key: str = "data.augment") -> list[tuple[str, dict]]:
    """`[crop, {rotate: {degrees: 15}}]` -> `[("crop", {}), ("rotate", {"degrees": 15})]`."""
    out = []
    for item in spec:
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, Mapping) and len(item) == 1:
            name, kwargs = next(iter(item.items()))
            kwargs = dict(kwargs or {})
        else:
            raise ConfigError(f"{key} entry {item!r} must be a name or {{name: {{options}}}}; "
                              f"names: {', '.join(KNOWN)}")
        if name not in KNOWN:
            raise ConfigError(f"{key}: unknown augmentation {name!r}; choose from {', '.join(KNOWN)}")
        out.append((name, kwargs))
    return out


def build_augmentation(spec: Sequence[Any] | None, in_shape: Sequence[int],
                       num_classes: int | None = None, key: str = "data.augment") -> BatchAugment | None:
    """The kornia pipeline for `data.augment` (or the config key `key`), or None when it is empty.

    - `crop`: random crop back to the input size after zero padding (`padding`, default 1/8 of
      the side, i.e. the 4 pixels of 32x32 CIFAR training);
    - `flip`: horizontal flip with probability `p` (0.5);
    - `rotate`: rotation by up to `degrees` (10);
    - `jitter`: brightness and contrast (`strength` 0.2), which apply to any number of channels.
      Data are standardised, so outputs are not clipped to [0, 1]; kornia's saturation and hue
      clip, so they are left out;
    - `mixup`: convex combination of two images and their labels (Zhang et al. 2018), the share
      of the other image drawn uniformly from `lambda_val` ([0, 1]);
    - `cutmix`: a patch of another image pasted in, labels mixed by its area (Yun et al. 2019).
    """
    if not spec:
        return None
    import kornia.augmentation as K  # here, not at the top: ~0.2 s of import a run without augmentation skips

    _, height, width = (int(v) for v in in_shape)
    ops: list[nn.Module] = []
    mix = None
    entries = _entries(spec, key)
    for i, (name, kw) in enumerate(entries):
        try:
            if name in MIXES:
                if i != len(entries) - 1:
                    raise ConfigError(f"{key}: {name} must come last (it mixes the finished views)")
                if num_classes is None:
                    raise ConfigError(f"{key}: {name} needs the number of classes")
                lam = tuple(float(v) for v in kw.pop("lambda_val", (0.0, 1.0)))
                mix = (K.RandomMixUpV2(lambda_val=lam, data_keys=["input", "class"], **kw) if name == "mixup"
                       else K.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True, **kw))
            elif name == "crop":
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
            raise ConfigError(f"{key} {name}: {exc}") from exc
    # kornia 0.9's label rows are (own label, other label, lam): mixup's lam is the other image's
    # share, cutmix's (use_correct_lambda=True) the own image's; tests/test_augment.py pins both.
    return BatchAugment(K.AugmentationSequential(*ops) if ops else None, mix, num_classes,
                        lam_is_own_share=isinstance(mix, K.RandomCutMixV2))

"""Model factories. Any callable `f(in_shape, num_classes, **kwargs) -> nn.Module` named by a
`_target_` in config can be a teacher or a student; these are the built-in ones.

Layers have stable module paths (`features.2`, `layer3`, `classifier`) so that feature-based
losses can name them in config and capture them with forward hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0) -> nn.Module:
    """A multi-layer perceptron over the flattened image."""
    in_features = 1
    for d in in_shape:
        in_features *= int(d)
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = h
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*layers))
    model.add_module("classifier", nn.Linear(prev, num_classes))
    return model


def cnn(in_shape: Sequence[int], num_classes: int, width: int = 32, depth: int = 3) -> nn.Module:
    """A plain VGG-style CNN: `depth` conv-BN-ReLU blocks whose channels double every block
    from `width`; 2x2 max-pooling after a block while the feature map is at least 4 pixels."""
    if depth < 1 or width < 1:
        raise ValueError("cnn needs depth >= 1 and width >= 1")
    channels, size = int(in_shape[0]), min(int(in_shape[1]), int(in_shape[2]))
    blocks: list[nn.Module] = []
    for i in range(depth):
        out = width * 2 ** min(i, 3)
        block = [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                 nn.ReLU(inplace=True)]
        if size >= 4 and i < depth - 1:
            block.append(nn.MaxPool2d(2))
            size //= 2
        blocks.append(nn.Sequential(*block))
        channels = out
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(*blocks))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.add_module("classifier", nn.Linear(channels, num_classes))
    return model


class BasicBlock(nn.Module):
    """The two-conv residual block of He et al. (2016), with a 1x1 projection on the shortcut
    when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet (He et al. 2016): a 3x3 stem and three stages `layer1..3`
    of BasicBlocks, the last two halving the resolution."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 16,
                 blocks: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(int(in_shape[0]), width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        ch = width
        stages = []
        for i, n in enumerate(blocks):
            out = width * 2**i
            layers = [BasicBlock(ch if j == 0 else out, out, 2 if (i > 0 and j == 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*layers))
            ch = out
        self.layer1, self.layer2, self.layer3 = (stages + [nn.Identity()] * 3)[:3]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def resnet(in_shape: Sequence[int], num_classes: int, width: int = 16,
           blocks: Sequence[int] = (1, 1, 1)) -> nn.Module:
    """Factory for `ResNet` so configs name every model the same way."""
    if len(blocks) != 3:
        raise ValueError("resnet takes exactly three stage sizes, e.g. blocks=[1,1,1]")
    return ResNet(in_shape, num_classes, width=width, blocks=blocks)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return total, nonzero


def transformer_classifier(in_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """A transformer encoder classifier over token ids (kdpipe.models.text; imports transformers)."""
    from kdpipe.models.text import transformer_classifier as build

    return build(in_shape, num_classes, **kwargs)


def causal_lm(in_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """A GPT-2-style causal language model over token ids (kdpipe.models.text; imports transformers)."""
    from kdpipe.models.text import causal_lm as build

    return build(in_shape, num_classes, **kwargs)


def multitask_student(in_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """One model with a head per task over multi-task data (kdpipe.models.multitask)."""
    from kdpipe.models.multitask import multitask_student as build

    return build(in_shape, num_classes, **kwargs)


def task_router(in_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """One teacher per task over multi-task data (kdpipe.models.multitask)."""
    from kdpipe.models.multitask import task_router as build

    return build(in_shape, num_classes, **kwargs)

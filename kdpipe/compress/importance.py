"""How structured pruning scores a group of coupled channels: Torch-Pruning's criteria, named.

Each class is the Torch-Pruning importance of the paper it cites, with the paper's settings as
defaults; `conf/prune/importance/<name>.yaml` names one by `_target_` (`prune/importance=taylor`).
Any `torch_pruning.importance.Importance` works the same way (e.g.
`prune.importance._target_=torch_pruning.importance.LAMPImportance`), and so does a user's own
callable `group -> scores`. A criterion that reads loss gradients sets `needs_gradients = True`:
the pruning callback then accumulates them on a few training batches before each step.
"""

from __future__ import annotations

import torch_pruning as tp


class Magnitude(tp.importance.GroupMagnitudeImportance):
    """L1 norm of each filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets",
    sec. 3.1): small filters produce weak feature maps."""

    def __init__(self, p: int = 1) -> None:
        super().__init__(p=p)


class Taylor(tp.importance.GroupTaylorImportance):
    """First-order Taylor estimate of the loss change when a channel is removed, |w * dL/dw|
    (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", eq. 8)."""

    needs_gradients = True


class FPGM(tp.importance.FPGMImportance):
    """Distance to the geometric median of the layer's filters (He et al. 2019, "Filter Pruning
    via Geometric Median", eq. 4): a filter close to the median is replaceable by the others."""


class BNScale(tp.importance.BNScaleImportance):
    """The batch-norm scale |gamma| of each channel (Liu et al. 2017, "Network Slimming",
    sec. 3.2): a channel whose scale is near zero contributes little."""


def needs_gradients(importance: object) -> bool:
    """True for a criterion that reads `.grad` (Torch-Pruning's Taylor family included)."""
    return bool(getattr(importance, "needs_gradients",
                        isinstance(importance, tp.importance.GroupTaylorImportance)))

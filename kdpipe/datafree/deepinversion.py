"""DeepInversion (Yin, Molchanov, Alvarez, Li, Mallya, Hoiem, Jha & Kautz 2020, "Dreaming to
Distill", eq. 2-4): inputs synthesised from a trained teacher alone. A batch of noise is optimised
so that, at every batch-norm layer, the batch's feature mean and variance match the layer's running
statistics (what the teacher saw in training), the teacher assigns each input its target class
(cross-entropy), and the inputs stay smooth (total variation) and bounded (L2). Random jitter and
flips each step keep the result from over-fitting one alignment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import ConfigError

log = logging.getLogger("kdpipe")

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class BatchNormStatistics:
    """Forward hooks on every batch-norm layer of `model`: after a forward pass, `loss()` sums over
    layers how far the batch statistics of each layer's input (over the batch and space) are from
    the layer's running statistics.

    `relative` (the default): the root mean square over channels of (mean - running_mean) /
    sqrt(running_var) plus that of var / running_var - 1, so every layer weighs the same whatever
    the scale of its activations. Otherwise the paper's eq. 3, ||mean - running_mean||_2 +
    ||var - running_var||_2, where a layer of 256 channels with variances near 50 (a trained CNN's
    last blocks) outweighs the rest by two orders of magnitude: on kdpipe's Fashion-MNIST CNN, 200
    steps at weight 10 brought it from 3,170 to 346 while the teacher still put the inputs in other
    classes than their targets (cross-entropy 7.1, against 0.05 with the relative term).

    `loss(first)` weights the first layer's term: it sees the input's low-level statistics, and
    NVIDIA's reference ImageNet script for the paper counts it 10 times (kdpipe's `first_bn`)."""

    def __init__(self, model: nn.Module, role: str = "teacher",
                 fix: str = "use distill=data_free, whose generator is trained against the student and "
                            "needs none", relative: bool = True) -> None:
        self.relative = bool(relative)
        self.layers = [m for m in model.modules() if isinstance(m, _BN) and m.running_mean is not None]
        if not self.layers:
            raise ConfigError(f"DeepInversion matches the {role}'s batch-norm statistics, and the {role} "
                              f"({type(model).__name__}) has no BatchNorm layer with running statistics; "
                              f"{fix}")
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs, _output) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        if self.relative:
            scale = module.running_var + module.eps
            self.terms.append(((mean - module.running_mean).pow(2) / scale).mean().sqrt()
                              + (var / scale - 1).pow(2).mean().sqrt())
        else:
            self.terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                              + torch.linalg.vector_norm(var - module.running_var))

    def loss(self, first: float = 1.0) -> torch.Tensor:
        """The sum over layers since the last call, the first layer's term weighted by `first`."""
        terms, self.terms = self.terms, []
        return first * terms[0] + sum(terms[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between neighbouring pixels, across rows and across columns."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()


def synthesize_batch(teacher: nn.Module, targets: torch.Tensor, in_shape: tuple[int, ...], steps: int,
                     lr: float = 0.1, bn: float = 10.0, ce: float = 1.0, tv: float = 1e-3, l2: float = 0.0,
                     jitter: int = 2, flip: bool = False, relative: bool = True, first_bn: float = 1.0,
                     generator: torch.Generator | None = None,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> torch.Tensor:
    """One batch of inputs, one per entry of `targets`, optimised by Adam for `steps` steps from
    Gaussian noise (in the teacher's normalised input space). `on_step(step, losses)` sees each
    step's terms (unweighted)."""
    was_training = teacher.training
    teacher = teacher.eval()
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    for p in trainable:  # gradients flow to the inputs only
        p.requires_grad_(False)
    stats = BatchNormStatistics(teacher, relative=relative)
    x = torch.randn(len(targets), *in_shape, generator=generator).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    try:
        for step in range(steps):
            view = x
            if jitter:
                dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
                view = torch.roll(view, shifts=(dx, dy), dims=(-2, -1))
            if flip and torch.rand((), generator=generator) < 0.5:
                view = torch.flip(view, dims=(-1,))
            logits = teacher(view)
            terms = {"bn": stats.loss(first_bn), "ce": F.cross_entropy(logits, targets),
                     "tv": total_variation(view), "l2": view.pow(2).mean()}
            loss = bn * terms["bn"] + ce * terms["ce"] + tv * terms["tv"] + l2 * terms["l2"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step, {k: float(v.detach()) for k, v in terms.items()})
    finally:
        stats.remove()
        for p in trainable:
            p.requires_grad_(True)
        teacher.train(was_training)
    return x.detach()


def synthesize(teacher: nn.Module, num_images: int, in_shape: tuple[int, ...], num_classes: int,
               batch_size: int = 256, seed: int = 0, on_batch: Callable[[int, int], None] | None = None,
               on_step: Callable[[int, int, dict[str, float]], None] | None = None,
               **options) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_images` inputs with balanced target classes, `batch_size` at a time (the batch-norm
    statistics are a batch's, so a batch mixes every class); returns (images, targets)."""
    g = torch.Generator().manual_seed(int(seed))
    targets = torch.arange(num_images) % num_classes
    targets = targets[torch.randperm(num_images, generator=g)]
    images = []
    for b, start in enumerate(range(0, num_images, batch_size)):
        t = targets[start:start + batch_size]
        step_cb = (lambda s, losses, b=b: on_step(b, s, losses)) if on_step else None
        images.append(synthesize_batch(teacher, t, in_shape, generator=g, on_step=step_cb, **options))
        if on_batch is not None:
            on_batch(b, len(images[-1]))
    return torch.cat(images), targets

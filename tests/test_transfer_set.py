"""The label-scarce regime (`data.labeled_fraction`, Hinton's transfer set) and the label-mixing
augmentations (mixup, cutmix) that teacher and student see alike."""

from __future__ import annotations

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from kdpipe.data import SyntheticDataModule
from kdpipe.data.augment import build_augmentation
from kdpipe.data.base import UNLABELED
from kdpipe.distill.cache import cached_train_loader, compute_logits
from kdpipe.errors import ConfigError
from kdpipe.losses import CrossEntropy, DistillOutputs, NonTargetClassKD, TargetClassKD, WeightedSum
from kdpipe.losses.base import label_cross_entropy
from kdpipe.models import cnn
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.training import Optim
from tests.conftest import make_cfg

ADAMW = Optim(functools.partial(torch.optim.AdamW, lr=0.01))


def _dm(fraction: float, seed: int = 0, **kw) -> SyntheticDataModule:
    kw.setdefault("num_samples", 800)
    dm = SyntheticDataModule(seed=seed, labeled_fraction=fraction, **kw)
    dm.setup("fit")
    return dm


def test_labeled_fraction_hides_a_seeded_share_of_training_labels_and_keeps_every_image():
    full, dm = _dm(1.0), _dm(0.05)
    x, y = dm.train_set.tensors
    assert torch.equal(x, full.train_set.tensors[0]), "every image stays in the transfer set"
    labeled = y != UNLABELED
    assert int(labeled.sum()) == round(0.05 * len(y))
    assert torch.equal(y[labeled], full.train_set.tensors[1][labeled]), "kept labels are the true ones"
    assert set(y[labeled].tolist()) == set(range(4)), "every class keeps a label"
    assert torch.equal(_dm(0.05).train_set.tensors[1], y), "the same seed hides the same labels"
    assert not torch.equal(_dm(0.05, seed=1).train_set.tensors[1][:200] != UNLABELED, labeled[:200])
    # hard-label training sees the labeled share; a distilled student sees all images
    seen = torch.cat([b[1] for b in dm.train_dataloader()])
    assert len(seen) == int(labeled.sum()) and bool((seen != UNLABELED).all())
    assert len(torch.cat([b[1] for b in dm.transfer_dataloader()])) == len(y)
    # validation and test keep their labels, and the stage keys see the change
    assert torch.equal(dm.val_set.tensors[1], full.val_set.tensors[1])
    assert dm.fingerprint != full.fingerprint


def test_one_class_present_in_the_labels_is_never_left_unlabeled():
    dm = _dm(0.001, num_samples=400)  # round(0.001 * n) = 0 labels: one per class is kept
    y = dm.train_set.tensors[1]
    assert sorted(y[y != UNLABELED].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "half"])
def test_a_labeled_fraction_outside_the_unit_interval_is_refused_with_its_range(bad):
    with pytest.raises(ConfigError, match=r"data.labeled_fraction=.* \(0, 1\]"):
        make_cfg([f"data.labeled_fraction={bad}"]) and SyntheticDataModule(labeled_fraction=bad)


def test_label_terms_skip_hidden_labels_and_a_batch_without_labels_gives_zero():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([2, UNLABELED, 0, UNLABELED])
    out = DistillOutputs(s, t, y)
    assert CrossEntropy()(out).item() == pytest.approx(F.cross_entropy(s[[0, 2]], y[[0, 2]]).item())
    for term in (TargetClassKD(2.0), NonTargetClassKD(2.0)):
        assert term(out).item() == pytest.approx(term(DistillOutputs(s[[0, 2]], t[[0, 2]], y[[0, 2]])).item())
    none = DistillOutputs(s, t, torch.full((4,), UNLABELED))
    for term in (CrossEntropy(), TargetClassKD(2.0), NonTargetClassKD(2.0)):
        value = term(none)
        assert value.item() == 0.0 and value.requires_grad is False or value.grad_fn is not None
    # soft labels (mixup): the CE of each row's mixture, averaged over the label mass
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    logp = F.log_softmax(s, -1)
    want = -(0.7 * logp[0, 0] + 0.3 * logp[0, 1] + logp[2, 2] + 0.5 * logp[3, 0]) / 2.5
    assert label_cross_entropy(s, soft).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_labels_carry_the_share_of_each_image_in_the_mixed_image(mix):
    # image i is constant i, so a mixed image's mean is the label-weighted mean of the classes
    torch.manual_seed(0)
    x = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 3])
    aug = build_augmentation([mix], (1, 8, 8), 4)
    for _ in range(5):
        mixed, soft = aug(x, y)
        assert soft.shape == (4, 4) and torch.allclose(soft.sum(1), torch.ones(4))
        assert torch.allclose(mixed.mean((1, 2, 3)), soft @ torch.arange(4.0), atol=1e-5)
    # a hidden label contributes no label mass, its image still mixes in
    _, soft = aug(x, torch.tensor([0, 1, 2, UNLABELED]))
    assert float(soft.sum()) < 4.0


def test_a_mix_must_come_last():
    with pytest.raises(ConfigError, match="mixup must come last"):
        build_augmentation(["mixup", "flip"], (1, 8, 8), 4)


def test_mixup_and_labeled_fraction_compose_from_the_command_line():
    cfg = make_cfg(["data.labeled_fraction=0.1", "data.augment=[crop,mixup]"])
    assert cfg.data.labeled_fraction == 0.1 and list(cfg.data.augment) == ["crop", "mixup"]


def _fit(module, loader, dm, epochs) -> float:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]


def test_with_few_labels_the_student_learns_more_from_the_teacher_on_unlabeled_images():
    """Hinton's transfer set at 2 % labels: scratch sees 11 labeled images, the distilled student
    those labels plus the teacher's outputs on all 560 training images."""
    full = _dm(1.0, noise=1.5)
    pl.seed_everything(0, verbose=False)
    teacher = cnn((1, 8, 8), 4, width=8, depth=2)
    _fit(ClassifierModule(teacher, 4, ADAMW), full.train_dataloader(), full, 8)  # "trained elsewhere"
    dm = _dm(0.02, noise=1.5)
    steps = math.ceil(len(dm.train_set) / dm.batch_size) * 6  # equal optimiser steps for both
    pl.seed_everything(1, verbose=False)
    scratch = _fit(ClassifierModule(cnn((1, 8, 8), 4, width=4, depth=2), 4, ADAMW), dm.train_dataloader(), dm,
                   steps // len(dm.train_dataloader()))
    pl.seed_everything(1, verbose=False)
    loss = WeightedSum.from_config(make_cfg(["distill=kd"]).distill.terms)
    student = cnn((1, 8, 8), 4, width=4, depth=2)
    kd = DistillationModule(student, teacher.eval(), loss, 4, dm.example_input(2), ADAMW)
    distilled = _fit(kd, cached_train_loader(dm, compute_logits(teacher, dm.train_set)), dm, 6)
    assert distilled > scratch + 0.08, (distilled, scratch)  # measured: 0.64 against 0.50

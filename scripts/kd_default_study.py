"""Why does `kd` lose to `none` at the default settings? Direct Lightning runs on digits:
one teacher (cnn width 32 depth 3, seed 0), then students given as
`width,depth,epochs,lr,T,alpha,seed` (alpha < 0 = scratch on hard labels).

    python scripts/kd_default_study.py 8,2,10,0.01,4,-1,1 8,2,10,0.01,4,0.9,1 8,2,30,0.01,4,0.9,1

Prints the teacher's confidence on its own training set and each student's test accuracy.
Results and their reading: docs/distillation.md, "Pitfalls, measured".
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
import warnings

import pytorch_lightning as pl
import torch

from kdpipe.data import DigitsDataModule
from kdpipe.losses import WeightedSum
from kdpipe.models import cnn
from kdpipe.modules import ClassifierModule, DistillationModule
from kdpipe.training import Optim


def optim(lr: float) -> Optim:
    """What `optim=adamw` (the default) builds: AdamW, weight decay 5e-4, cosine annealing over each fit."""
    return Optim(functools.partial(torch.optim.AdamW, lr=lr, weight_decay=5e-4),
                 functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=None))


def kd_loss(temperature: float, alpha: float) -> WeightedSum:
    """`distill=kd`'s terms (conf/base/offline.yaml): CE at weight 1 - alpha, the softened KL at alpha."""
    return WeightedSum.from_config({
        "ce": {"_target_": "kdpipe.losses.CrossEntropy", "weight": 1.0 - alpha},
        "kd": {"_target_": "kdpipe.losses.SoftTargetKL", "weight": alpha, "temperature": temperature},
    })


def fit(module, dm, epochs: int) -> float:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]


def main(specs: list[str]) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    teacher = cnn((1, 8, 8), 10, width=32, depth=3)
    print("teacher test acc", fit(ClassifierModule(teacher, 10, optim(0.01)), dm, 10), flush=True)
    teacher.eval()
    with torch.no_grad():
        x, y = dm.train_set.tensors
        z = teacher(x)
        print("teacher train acc", (z.argmax(-1) == y).float().mean().item())
        for T in (1, 2, 4):
            confidence = (z / T).softmax(-1).max(-1).values.mean().item()
            print(f"T={T}: mean max softened probability {confidence:.4f}")
    for spec in specs:
        width, depth, epochs, lr, T, alpha, seed = spec.split(",")
        pl.seed_everything(int(seed), verbose=False)
        student = cnn((1, 8, 8), 10, width=int(width), depth=int(depth))
        n = sum(p.numel() for p in student.parameters())
        t0 = time.time()
        if float(alpha) < 0:
            module = ClassifierModule(student, 10, optim(float(lr)))
        else:
            module = DistillationModule(student, teacher, kd_loss(float(T), float(alpha)), 10,
                                        dm.example_input(2), optim(float(lr)))
        acc = fit(module, dm, int(epochs))
        print(f"w={width} d={depth} params={n} epochs={epochs} lr={lr} T={T} alpha={alpha} seed={seed} "
              f"test acc={acc:.4f} ({time.time() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", metavar="SPEC",
                        help="one student run: width,depth,epochs,lr,T,alpha,seed (alpha < 0: scratch)")
    main(parser.parse_args().specs)

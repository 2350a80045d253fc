"""Training throughput of a kdpipe stage against a plain PyTorch loop, interleaved in one process.

Both sides train the same model (the default student, `kdpipe.models.cnn` from
conf/student/cnn_small.yaml, from the same initial weights) on the same batches (the data
module's own train loader: same order, same batch size) with the same optimiser (AdamW, lr
and weight decay from conf/config.yaml `optim`, the cosine schedule stepped per epoch) for the
same epochs, and both validate once per epoch on the val loader:

- kdpipe: the `ClassifierModule` (scratch stage) or `DistillationModule` with the KD loss of
  conf/distill/kd.yaml (KD stage), fitted by `kdpipe.training.Fitter`, i.e. the Trainer of
  `PipelineContext.trainer` (conf/trainer/default.yaml, MLflow logger on a stage run,
  ModelCheckpoint every epoch), exactly as a stage runs it;
- plain: a hand-written loop (forward, loss, backward, step; a no-grad pass over val per epoch).

The KD stage runs as the default pipeline runs it: teacher logits precomputed once
(`distill.scheme.cache_teacher=auto`) and read from the batches; `kd_live` runs the teacher every step.
Rounds alternate which side goes first. Reported: training samples/s over the whole fit
(Trainer construction, validation, checkpoints and logging included: what a user waits for)
and over the training epochs alone, medians over the rounds, and the kdpipe/plain ratio
(median of the per-round ratios).

    python scripts/bench_overhead.py                                  # digits, as the default run
    python scripts/bench_overhead.py --repeat-data 20                 # digits tiled 20x (380 batches)
    python scripts/bench_overhead.py --data fashion_mnist --limit-train 12000
    python scripts/bench_overhead.py --profile kd                     # cProfile of one kdpipe fit
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdpipe.cli import CONFIG_PATH, _quiet_libraries  # noqa: E402
from kdpipe.distill.cache import cached_train_loader, compute_logits  # noqa: E402
from kdpipe.losses import WeightedSum  # noqa: E402
from kdpipe.models.io import build_model  # noqa: E402
from kdpipe.modules import ClassifierModule, DistillationModule  # noqa: E402
from kdpipe.stages.base import PipelineContext  # noqa: E402
from kdpipe.tracking.store import setup_tracking  # noqa: E402
from kdpipe.training import Fitter  # noqa: E402

STAGES = ("scratch", "kd", "kd_live")


def build_kdpipe_module(ctx: PipelineContext, stage: str, student: nn.Module,
                        teacher: nn.Module) -> pl.LightningModule:
    """The kdpipe LightningModule of a stage, built as kdpipe.distill.schemes builds it (the one
    place to adapt when the modules' optimiser arguments change)."""
    if stage == "scratch":
        return ClassifierModule(student, ctx.num_classes, ctx.optim())
    return DistillationModule(student, teacher, WeightedSum.from_config(ctx.cfg.distill.terms),
                              ctx.num_classes, ctx.example_input, ctx.optim())


def plain_optimizer(cfg, model: nn.Module, epochs: int):
    """AdamW with conf/config.yaml `optim`, cosine over the epochs as ClassifierModule schedules it."""
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr),
                            weight_decay=float(cfg.optim.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs)))
    return opt, sched


def plain_fit(cfg, stage: str, student: nn.Module, teacher: nn.Module, train: DataLoader, val: DataLoader,
              epochs: int) -> float:
    """The hand-written loop; returns the seconds of the training epochs alone."""
    T, alpha = float(cfg.distill.temperature), float(cfg.distill.alpha)
    opt, sched = plain_optimizer(cfg, student, epochs)
    teacher.eval()
    train_s = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        student.train()
        for batch in train:
            x, y = batch[0], batch[1]
            logits = student(x)
            if stage == "scratch":
                loss = F.cross_entropy(logits, y)
            else:
                if stage == "kd":
                    t_logits = batch[2]
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1),
                              reduction="batchmean", log_target=True) * T * T
                loss = alpha * kd + (1 - alpha) * F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        student.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((student(x).argmax(-1) == y).sum())
                n += len(y)
    return train_s


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds += time.perf_counter() - self._t0


def kdpipe_fit(ctx: PipelineContext, stage: str, student: nn.Module, teacher: nn.Module,
               train: DataLoader | None, epochs: int, n: int) -> float:
    """One stage fit through kdpipe.training.Fitter, in its own MLflow run and checkpoint folder."""
    module = build_kdpipe_module(ctx, stage, student, teacher)
    timer = EpochTimer()
    with mlflow.start_run(run_name=stage) as run:
        fitter = Fitter(stage, f"bench-{stage}-{n}", run.info.run_id, ctx.tracking_uri, ctx.datamodule,
                        ctx.workdir, trainer_kwargs=ctx.section("trainer"),
                        checkpoint_root=ctx.checkpoint_root,
                        callbacks=ctx.section("callbacks") or {})
        fitter.fit(module, "student", epochs, [timer], train_loader=train)
    return timer.seconds


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("config", overrides=overrides)


def tile(ds: TensorDataset, k: int) -> TensorDataset:
    return TensorDataset(*(t.repeat(k, *([1] * (t.dim() - 1))) for t in ds.tensors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", help="a conf/data option (digits, fashion_mnist, synthetic)")
    ap.add_argument("--repeat-data", type=int, default=1,
                    help="tile the train and val splits this many times")
    ap.add_argument("--limit-train", type=int, default=None, help="data.limit_train (fashion_mnist)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stages", nargs="+", default=["scratch", "kd"], choices=STAGES)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    ap.add_argument("--profile", choices=STAGES, help="instead: cProfile one kdpipe fit and one plain fit")
    args = ap.parse_args()
    _quiet_libraries()
    warnings.filterwarnings("ignore")
    logging.getLogger("kdpipe").setLevel(logging.ERROR)

    tmp = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    os.chdir(tmp)
    over = [f"data={args.data}", f"trainer.max_epochs={args.epochs}", *args.override]
    if args.limit_train:
        over.append(f"data.limit_train={args.limit_train}")
    cfg = compose_cfg(over)
    setup_tracking(f"sqlite:///{tmp / 'mlflow.db'}", "bench_overhead")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    if args.repeat_data > 1:
        dm.train_set, dm.val_set = tile(dm.train_set, args.repeat_data), tile(dm.val_set, args.repeat_data)
    ctx = PipelineContext(cfg, dm, tmp, mlflow.get_tracking_uri())
    student_arch = OmegaConf.to_container(cfg.student.model, resolve=True)
    teacher = build_model(OmegaConf.to_container(cfg.teacher.model, resolve=True)).eval()
    logits = compute_logits(teacher, dm.train_set)
    n_train = len(dm.train_set)
    print(f"{args.data} x{args.repeat_data}: {n_train} training samples, "
          f"{len(dm.train_dataloader())} batches of {dm.batch_size}, {len(dm.val_set)} val samples; "
          f"{args.epochs} epochs; torch threads "
          f"{torch.get_num_threads()}; trainer {dict(ctx.section('trainer'))}", flush=True)

    def loaders(stage: str):
        train = cached_train_loader(dm, logits) if stage == "kd" else None  # None: the data module's loader
        return train, (train or dm.train_dataloader())

    def run(side: str, stage: str, n: int) -> tuple[float, float]:
        pl.seed_everything(0, verbose=False)
        student = build_model(student_arch)
        train, plain_train = loaders(stage)
        t0 = time.perf_counter()
        if side == "kdpipe":
            train_s = kdpipe_fit(ctx, stage, student, teacher, train, args.epochs, n)
        else:
            train_s = plain_fit(cfg, stage, student, teacher, plain_train, dm.val_dataloader(), args.epochs)
        return time.perf_counter() - t0, train_s

    run("kdpipe", args.stages[0], -1)  # warm-up: first-use costs (imports, allocator) hit neither side
    run("plain", args.stages[0], -1)
    if args.profile:
        for side in ("kdpipe", "plain"):
            prof = cProfile.Profile()
            prof.enable()
            wall, _ = run(side, args.profile, -2)
            prof.disable()
            print(f"\n=== {side} {args.profile}: {wall:.2f} s")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return

    samples = args.epochs * n_train
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for stage in args.stages:
            order = ("kdpipe", "plain") if r % 2 == 0 else ("plain", "kdpipe")
            for side in order:
                results.setdefault((stage, side), []).append(run(side, stage, r))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print("\n| stage | side | fit samples/s | train-epoch samples/s | fit s | kdpipe/plain (fit) | "
          "kdpipe/plain (train epochs) |\n|---|---|---|---|---|---|---|")
    for stage in args.stages:
        kd, pl_ = results[(stage, "kdpipe")], results[(stage, "plain")]
        ratio_fit = statistics.median(p[0] / k[0] for k, p in zip(kd, pl_, strict=True))
        ratio_train = statistics.median(p[1] / k[1] for k, p in zip(kd, pl_, strict=True))
        for side, vals in (("kdpipe", kd), ("plain", pl_)):
            fit_s = statistics.median(v[0] for v in vals)
            train_s = statistics.median(v[1] for v in vals)
            spread = f"{min(v[0] for v in vals):.2f}-{max(v[0] for v in vals):.2f}"
            ratios = f"| {ratio_fit:.2f} | {ratio_train:.2f} |" if side == "kdpipe" else "| | |"
            print(f"| {stage} | {side} | {samples / fit_s:,.0f} | {samples / train_s:,.0f} | "
                  f"{fit_s:.2f} ({spread}) {ratios}")


if __name__ == "__main__":
    main()

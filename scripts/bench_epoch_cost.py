"""Benchmark of the distillation schemes on Fashion-MNIST: test accuracy (mean ± std over seeds)
of scratch and every scheme for one fixed teacher and student at equal epochs, and the time of a
distillation epoch with the cached teacher, with the live teacher and of a scratch epoch.

    python scripts/bench_epoch_cost.py --limit-train 8000 --epochs 5 --seeds 0 1 2

Accuracies come from real pipeline runs (`run_pipeline`, prune/quantize off) in a throw-away
MLflow store; the teacher is trained once (seed 0) and loaded by every other run through
`teacher.checkpoint`. The data split is fixed (`data.seed=0`); the seed changes the student's
initialisation. Every scheme runs its config's defaults (`distill=<scheme>`), except
`born_again` with one generation (`distill.scheme.generations=1`); `deep_to_shallow` runs only
when named in --schemes. Epoch times are measured separately with a Lightning callback (training
part of the epoch only, median over epochs after the first), the three variants interleaved for
3 rounds in one process, so their ratios are comparable even on a busy machine, their absolute
values less so. The KD timed is `distill=kd`'s `distill.terms` (CE and the softened KL).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdpipe.cli import CONFIG_PATH, _quiet_libraries  # noqa: E402
from kdpipe.distill.cache import cached_train_loader, compute_logits  # noqa: E402
from kdpipe.losses import WeightedSum  # noqa: E402
from kdpipe.models.io import build_model, load_model  # noqa: E402
from kdpipe.modules import ClassifierModule, DistillationModule  # noqa: E402
from kdpipe.pipeline import run_pipeline  # noqa: E402
from kdpipe.training import Optim  # noqa: E402

SCHEMES = {
    "scratch": ["distill=none"],
    "kd": ["distill=kd"],
    "dkd": ["distill=dkd"],
    "fitnet": ["distill=fitnet"],
    "attention": ["distill=attention"],
    "rkd": ["distill=rkd"],
    "sp": ["distill=sp"],
    "dml": ["distill=dml"],
    "born_again": ["distill=born_again", "distill.scheme.generations=1"],
    "deep_to_shallow": ["distill=deep_to_shallow"],
}
# The schemes run when --schemes is not given: those of the table in docs/distillation.md.
DEFAULT_SCHEMES = [name for name in SCHEMES if name != "deep_to_shallow"]


class EpochTimer(pl.Callback):
    """Wall and CPU seconds of each training epoch. With one torch thread, CPU time is what the
    epoch costs even when other processes share the cores; wall time is what a user waits."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.wall.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("config", overrides=overrides)


def epoch_times(cfg, teacher_path: Path, epochs: int, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Median training-epoch seconds (wall and CPU) of scratch, KD with cached logits and KD with
    the live teacher, the three interleaved for `rounds` rounds so that load changes on a shared
    machine hit all three alike; the first epoch of each fit is left out (warm-up). `cfg` is a
    `distill=kd` config: its `distill.terms` are the KD loss, its `optim` the optimiser."""
    dm = instantiate(cfg.data)
    dm.setup("fit")
    optim = Optim.from_config(cfg.optim)
    arch = OmegaConf.to_container(cfg.student.model, resolve=True)
    teacher = load_model(teacher_path)
    logits = compute_logits(teacher, dm.train_set)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name in ("scratch", "kd_cached", "kd_live"):
            pl.seed_everything(0, verbose=False)
            student = build_model(arch)
            if name == "scratch":
                module = ClassifierModule(student, dm.num_classes, optim)
            else:
                module = DistillationModule(student, teacher, WeightedSum.from_config(cfg.distill.terms),
                                            dm.num_classes, dm.example_input(2), optim)
            timer = EpochTimer()
            trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                 callbacks=[timer])
            loader = cached_train_loader(dm, logits) if name == "kd_cached" else dm.train_dataloader()
            trainer.fit(module, train_dataloaders=loader)
            wall.setdefault(name, []).extend(timer.wall[1:] or timer.wall)
            cpu.setdefault(name, []).extend(timer.cpu[1:] or timer.cpu)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])}
            for name in wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-train", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--schemes", nargs="*", default=DEFAULT_SCHEMES, choices=list(SCHEMES), metavar="SCHEME",
                    help=f"of {', '.join(SCHEMES)} (default: all but deep_to_shallow); "
                         f"none: only the epoch times")
    ap.add_argument("--no-timing", action="store_true", help="skip the epoch-time measurement")
    ap.add_argument("--override", nargs="*", default=[],
                    help="extra Hydra overrides for every run, e.g. student.model.depth=3")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_distill.json")
    args = ap.parse_args()
    _quiet_libraries()
    warnings.filterwarnings("ignore")
    logging.getLogger("kdpipe").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    base = ["data=fashion_mnist", f"data.limit_train={args.limit_train}", "data.seed=0",
            f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
            "teacher.model.width=16", "prune=none", "quantize=none",
            "eval.latency_iters=5", "eval.latency_warmup=1", "tracking.experiment=bench_distill",
            f"checkpoint_dir={tmp / 'checkpoints'}",  # never resume a checkpoint an earlier benchmark left
            *args.override]
    t0 = time.time()
    teacher_base = [o for o in base if not o.startswith("distill")]  # distill=none: no temperature, alpha
    teacher_run = run_pipeline(compose_cfg([*teacher_base, "seed=0", "distill=none"]), tmp / "teacher")
    teacher_path = tmp / "teacher" / "teacher" / "model.pt"
    teacher_acc = next(r for r in mlflow.search_runs(experiment_names=["bench_distill"], output_format="list")
                       if r.data.tags.get("kdpipe.stage") == "teacher").data.metrics["test/acc"]
    print(f"teacher test/acc {teacher_acc:.4f} ({time.time() - t0:.0f}s); "
          f"scratch seed 0 {teacher_run['test/acc']:.4f}", flush=True)

    results: dict[str, list[float]] = {}
    for scheme in args.schemes:
        for seed in args.seeds:
            t1 = time.time()
            cfg = compose_cfg([*base, f"seed={seed}", f"teacher.checkpoint={teacher_path}", *SCHEMES[scheme]])
            metrics = run_pipeline(cfg, tmp / f"{scheme}_{seed}")
            results.setdefault(scheme, []).append(metrics["test/acc"])
            print(f"{scheme:10s} seed {seed}: test/acc {metrics['test/acc']:.4f} ({time.time() - t1:.0f}s)",
                  flush=True)

    kd_cfg = compose_cfg([*teacher_base, "seed=0", "distill=kd"])  # the timed KD: CE + softened KL
    times = {} if args.no_timing else epoch_times(kd_cfg, teacher_path, args.epochs)
    student_arch = OmegaConf.to_container(kd_cfg.student.model, resolve=True)
    student_params = sum(p.numel() for p in build_model(student_arch).parameters())
    teacher_params = sum(p.numel() for p in load_model(teacher_path).parameters())

    lines = [f"Fashion-MNIST, {args.limit_train} training images, {args.epochs} epochs, seeds {args.seeds}; "
             f"teacher cnn width 16 depth 3 ({teacher_params:,} params, test acc {100 * teacher_acc:.2f} %), "
             f"student cnn_small ({student_params:,} params); overrides {args.override}", "",
             "| scheme | test acc (%) mean ± std | vs scratch (points) |", "|---|---|---|"]
    scratch = statistics.mean(results["scratch"]) if "scratch" in results else None
    for scheme, accs in results.items():
        mean, std = 100 * statistics.mean(accs), 100 * (statistics.stdev(accs) if len(accs) > 1 else 0.0)
        delta = "" if scratch is None or scheme == "scratch" else f"{mean - 100 * scratch:+.2f}"
        lines.append(f"| {scheme} | {mean:.2f} ± {std:.2f} | {delta} |")
    if times:
        lines += ["", "| epoch (training part) | wall s | × scratch | CPU s | × scratch |",
                  "|---|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t['wall']:.2f} | {t['wall'] / times['scratch']['wall']:.2f} | "
                     f"{t['cpu']:.2f} | {t['cpu'] / times['scratch']['cpu']:.2f} |")
    lines.append(f"\ntotal wall time {time.time() - t0:.0f} s")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "acc": results,
                                    "epoch_seconds": times, "teacher_acc": teacher_acc, "table": table},
                                   indent=2))


if __name__ == "__main__":
    main()

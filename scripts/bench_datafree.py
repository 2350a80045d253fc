"""The data-free benchmark of docs/data_free.md, on Fashion-MNIST: a student distilled from a
trained teacher with no training image (`distill=data_free` or `distill=deepinversion`), against
chance and against the same student trained on the real training set; and static int8 calibrated
on synthesised inputs against calibration on real images and against dynamic int8 (no calibration),
on both students.
The test split only measures. Seeds 0-2, mean ± std of the last epoch.

    python scripts/bench_distill.py --workdir W --phases teacher        # the teacher, once
    python scripts/bench_datafree.py --teacher W/teacher/teacher/model.pt
    python scripts/bench_datafree.py --teacher ... --phases report

Every run is a `kdpipe` command, printed before it starts, against `<workdir>/mlflow.db`; the
int8 variants of a seed reuse its student (same distill stage key).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "bench_datafree"
STUDENT = ["student=cnn", "student.model.width=10", "student.model.depth=4"]  # 39,000 parameters, 1/10
QUANT = {"int8-real": ["quantize=static"],
         "int8-synthetic": ["quantize=static", "quantize.calibration.source=synthetic"],
         "int8-dynamic": ["quantize=dynamic"]}


def commands(args: argparse.Namespace, seed: int) -> list[tuple[str, list[str]]]:
    common = ["data=fashion_mnist", "data.seed=0", f"seed={seed}", "prune=none",
              "trainer.enable_progress_bar=false", "eval.latency_iters=5", "eval.latency_warmup=1",
              f"tracking.experiment={EXPERIMENT}",
              f"teacher.checkpoint={args.teacher}", "teacher.model.depth=4", *STUDENT, *args.override]
    scheme = [f"distill={args.scheme}", f"student.max_epochs={args.epochs}"]
    out = []
    for name, quant in QUANT.items():  # the first trains the student, the others reuse it
        out.append((f"{args.scheme}-{name}-s{seed}", [*common, *scheme, *quant,
                                                      f"run_name={args.scheme}-{name}-s{seed}"]))
    real = [*common, "distill=none", f"student.max_epochs={args.real_epochs}"]
    out.append((f"real-s{seed}", [*real, "quantize=none", f"run_name=real-s{seed}"]))
    for name, quant in QUANT.items():  # the real-data student as received: int8 with and without data
        out.append((f"real-{name}-s{seed}", [*real, *quant, f"run_name=real-{name}-s{seed}"]))
    return out


def run(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{args.workdir / 'mlflow.db'}",
           "KDPIPE_CHECKPOINT_DIR": str(args.workdir / "checkpoints")}

    def one(job: tuple[str, list[str]]) -> int:
        name, cmd = job
        line = " ".join(shlex.quote(c) for c in cmd)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: kdpipe {line}", flush=True)
        with (args.workdir / f"{name}.log").open("w") as out:
            full = [sys.executable, "-m", "kdpipe", *cmd, f"hydra.run.dir={args.workdir / name}"]
            rc = subprocess.run(full, cwd=args.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                check=False).returncode
        print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {rc}", flush=True)
        return rc

    def seed_jobs(seed: int) -> int:  # a seed's commands in order: the int8 variants reuse its student
        return max(one(job) for job in commands(args, seed))

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(seed_jobs, args.seeds))
    if any(codes):
        sys.exit("some runs failed; see the logs in the workdir")


def ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f} (n={len(values)})"


def report(args: argparse.Namespace) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{args.workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string="attributes.status = 'FINISHED'")
    pipelines = {}  # the newest run of each name (search_runs lists newest first): a rerun replaces
    for r in runs:
        if r.data.tags.get("kdpipe.run_type") == "pipeline":
            pipelines.setdefault(r.info.run_name, r)
    children = [r for r in runs if r.data.tags.get("kdpipe.run_type") == "stage"]

    def stage(parent, name):
        return next((c for c in children if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                     and c.data.tags.get("kdpipe.stage") == name), None)

    teacher, fp32, real, int8, real_int8 = [], [], [], {k: [] for k in QUANT}, {k: [] for k in QUANT}
    for seed in args.seeds:
        first = pipelines.get(f"{args.scheme}-int8-real-s{seed}")
        if first is not None:
            fp32.append(stage(first, "distill").data.metrics["test/acc"])
            teacher.append(stage(first, "teacher").data.metrics["test/acc"])
        for name in QUANT:
            p = pipelines.get(f"{args.scheme}-{name}-s{seed}")
            if p is not None:
                int8[name].append(stage(p, "quantize").data.metrics["test/acc"])
            p = pipelines.get(f"real-{name}-s{seed}")
            if p is not None:
                real_int8[name].append(stage(p, "quantize").data.metrics["test/acc"])
        r = pipelines.get(f"real-s{seed}")
        if r is not None:
            real.append(stage(r, "distill").data.metrics["test/acc"])
    lines = [f"Teacher (loaded, never retrained): {ms(teacher[:1])} test acc. Student: cnn width 10 "
             f"depth 4 (39,000 parameters), `distill={args.scheme}` {args.epochs} epochs; real-data "
             f"reference: the same student from scratch on the training set, {args.real_epochs} epochs.", "",
             "| student | test acc % (mean ± std, last epoch) |", "|---|---|",
             "| chance | 10.00 |",
             f"| data-free (`distill={args.scheme}`), fp32 | {ms(fp32) if fp32 else ''} |",
             f"| real training set (scratch), fp32 | {ms(real) if real else ''} |"]
    for who, base, quantized in (("data-free", fp32, int8), ("real-data", real, real_int8)):
        for name, label in (("int8-real", "static int8, calibrated on real training images"),
                            ("int8-synthetic", "static int8, calibrated on synthesised inputs"),
                            ("int8-dynamic", "dynamic int8 (no calibration)")):
            if quantized[name]:
                drops = [f"{100 * (a - b):.2f}" for a, b in zip(base, quantized[name], strict=False)]
                lines.append(f"| {who} student, {label} | {ms(quantized[name])}; drop per seed "
                             f"{', '.join(drops)} |")
    text = "\n".join(lines) + "\n"
    (args.workdir / "report.md").write_text(text)
    print(text)
    plot_curves(args, [stage(p, "distill") for seed in args.seeds
                       if (p := pipelines.get(f"{args.scheme}-int8-real-s{seed}")) is not None])


def plot_curves(args: argparse.Namespace, runs: list) -> None:
    """`curves.png`: the data-free students' validation accuracy per epoch, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow.tracking.MlflowClient()
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, run in zip(args.seeds, runs, strict=False):
        history = sorted(client.get_metric_history(run.info.run_id, "val/acc"), key=lambda m: m.step)
        ax.plot(range(1, len(history) + 1), [100 * m.value for m in history], label=f"seed {seed}")
    ax.set(title=f"data-free student (distill={args.scheme}): val accuracy per epoch", xlabel="epoch",
           ylabel="val acc %")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.workdir / "curves.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_datafree")
    ap.add_argument("--teacher", type=Path, required=True, help="the trained teacher's model file")
    ap.add_argument("--phases", nargs="+", choices=["run", "report"], default=["run", "report"])
    ap.add_argument("--scheme", choices=["data_free", "deepinversion"], default="deepinversion")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=120, help="data-free student epochs")
    ap.add_argument("--real-epochs", type=int, default=10, help="epochs of the real-data reference")
    ap.add_argument("--override", nargs="*", default=[], help="more kdpipe overrides")
    args = ap.parse_args()
    args.workdir, args.teacher = args.workdir.resolve(), args.teacher.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if "run" in args.phases:
        run(args)
    if "report" in args.phases:
        report(args)


if __name__ == "__main__":
    main()

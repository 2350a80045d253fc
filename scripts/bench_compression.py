"""Compression ladder benchmark: fp32 student; + structured 50 %; + int8 static; + both; int8 under
an accuracy budget, and structured + int8 both under it; the formats below int8 (int4 weight-only,
4-bit k-means, binary). And, with `--recovery`, how much distilling recovers after pruning against
plain fine-tuning.

Each rung is a real kdpipe pipeline against one MLflow store (so for each seed the student is
trained once and the structured pruning done once, reused by the later rungs); accuracy, bytes and
FLOPs are the evaluate stage's numbers for the shipped model, mean ± std over `--seeds`. The student
trains `--epochs` on the full training set, long enough for its validation curve to flatten
(`curves.png`, and the last epochs printed). Batch-1 latency of the first seed's shipped models is
then measured again here, in one process, round-robin over several rounds (ONNX Runtime, CPU, one
thread), so the speed-ups compare like with like under the same machine load.

    python scripts/bench_compression.py                        # Fashion-MNIST if installed, else digits
    python scripts/bench_compression.py --recovery             # and the recovery table
    python scripts/bench_compression.py --data digits --epochs 10 --seeds 0

Prints Markdown tables and writes them, with the raw numbers, under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import mlflow
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kdpipe.cli import CONFIG_PATH
from kdpipe.config import validate
from kdpipe.metrics.measure import onnx_latency_ms
from kdpipe.pipeline import run_pipeline

BUDGET = ["compress.max_acc_drop=1.0"]
RUNGS = {
    "fp32 student": ["prune=none", "quantize=none"],
    "+ structured 50 %": ["prune=structured", "quantize=none"],
    "+ int8 static": ["prune=none", "quantize=static"],
    "+ structured 50 % + int8": ["prune=structured", "quantize=static"],
    "+ int8 static, budget 1 point": ["prune=none", "quantize=static", *BUDGET],
    "+ structured 50 % + int8, budget 1 point each": ["prune=structured", "quantize=static", *BUDGET],
    "+ int4 weight-only (group 32)": ["prune=none", "quantize=int4"],
    "+ int4 weight-only, 1 epoch straight-through": ["prune=none", "quantize=int4", "quantize.epochs=1"],
    "+ k-means 4-bit (1 epoch)": ["prune=none", "quantize=kmeans", "quantize.bits=4"],
    "+ binary (3 epochs)": ["prune=none", "quantize=binary"],
}
# Pruning then fine-tuning at equal epochs, three ways: on the labels, distilling from the teacher,
# distilling from the unpruned student (`--recovery`).
RECOVERY = {
    "fine-tuned on labels": ["prune.finetune.distill=false"],
    "recovered by KD from the teacher": ["prune.finetune.distill_from=teacher"],
    "recovered by KD from the unpruned student": ["prune.finetune.distill_from=input"],
}
# --ways: the distilling rows of RECOVERY by a short name.
WAYS = {"teacher": "recovered by KD from the teacher", "student": "recovered by KD from the unpruned student"}


def mean_std(values: list[float], sign: str = "") -> str:
    m = f"{statistics.mean(values):{sign}.2f}"
    return f"{m} ± {statistics.stdev(values):.2f}" if len(values) > 1 else m


def fashion_mnist_available() -> bool:
    root = Path(os.environ.get("KDPIPE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    return root.is_dir() and any(root.iterdir())


def base_overrides(args: argparse.Namespace) -> list[str]:
    data = args.data or ("fashion_mnist" if fashion_mnist_available() else "digits")
    over = [f"data={data}", "~teacher", "distill=none", f"student={args.student}",
            f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false",
            "eval.latency_iters=200", "export.onnx=true", "tracking.experiment=bench_compression"]
    if data == "fashion_mnist" and args.limit_train:
        over.append(f"data.limit_train={args.limit_train}")
    return over + list(args.override)


def rung_overrides(rung: list[str], args: argparse.Namespace) -> list[str]:
    """Structured pruning to 50 % of the channels in `--prune-steps` iterative steps, each followed
    by `--finetune-epochs` of fine-tuning; static int8 calibrated on 16 training batches."""
    extra = []
    if "prune=structured" in rung:
        extra += ["prune.sparsity=0.5", "prune/schedule=iterative",
                  f"prune.schedule.steps={args.prune_steps}",
                  f"prune.finetune.epochs={args.finetune_epochs}"]
    if "quantize=static" in rung:
        extra += ["quantize.calibration.num_batches=16"]
    return [*rung, *extra]


def recovery(args: argparse.Namespace, uri: str) -> str:
    """A teacher (cnn, width 32, trained here for each seed or loaded by `--teacher`) distilled into
    the student (width 16) by KD, pruned structured 60 % in one cut, then `--finetune-epochs` of
    fine-tuning each way of RECOVERY, for each seed; test accuracy mean ± std of the last epoch, and
    of the student before pruning."""
    data = args.data or ("fashion_mnist" if fashion_mnist_available() else "digits")
    # KD at T=4, alpha=0.9: the setting docs/compression.md was measured with (kdpipe's default then).
    base = [f"data={data}", "distill=kd", "distill.temperature=4", "distill.alpha=0.9",
            f"student={args.student}", "student.model.width=16",
            f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false", "quantize=none",
            "prune=structured", "prune.sparsity=0.6", f"prune.finetune.epochs={args.finetune_epochs}",
            "eval.latency_iters=20", "tracking.experiment=bench_recovery", *args.teacher, *args.override]
    if data == "fashion_mnist" and args.limit_train:
        base.append(f"data.limit_train={args.limit_train}")
    accs: dict[str, list[float]] = {}
    curves: dict[str, list[list[float]]] = {}
    before: list[float] = []
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for name, extra in RECOVERY.items():
            if args.ways and name in WAYS.values() and name not in {WAYS[w] for w in args.ways}:
                continue
            for seed in args.seeds:
                cfg = compose("config", overrides=[*base, *extra, f"seed={seed}", f"tracking.uri={uri}"])
                validate(cfg)
                folder = args.out / "recovery" / f"{name.replace(' ', '_')}-{seed}"
                accs.setdefault(name, []).append(100 * run_pipeline(cfg, folder)["test/acc"])
                stages = {r["stage"]: r for r in stage_rows(mlflow.last_active_run().info.run_id)}
                curves.setdefault(name, []).append(curve(stages["prune"]["run_id"], "prune/step_val_acc"))
                if name == "fine-tuned on labels":
                    before.append(100 * stages["distill"]["test/acc"])
    mean = {name: [statistics.mean(c) for c in zip(*runs, strict=True)] for name, runs in curves.items()}
    plot_curves(mean, args.out / "recovery_curves.png",
                "after pruning: validation accuracy per fine-tuning epoch (mean of the seeds)")
    ref = accs["fine-tuned on labels"]
    rows = [f"| fine-tuning after pruning | test acc % (mean ± std, {len(args.seeds)} seeds) "
            "| vs labels (points) |", "|---|---|---|",
            f"| (the KD student before pruning) | {mean_std(before)} | |"]
    for name, values in accs.items():
        gain = [a - b for a, b in zip(values, ref, strict=True)]
        rows.append(f"| {name} | {mean_std(values)} | {mean_std(gain, '+') if values is not ref else ''} |")
    return (f"recovery after structured 60 % pruning, {args.finetune_epochs} fine-tuning epochs each, "
            f"{' '.join(base)}, seeds {', '.join(map(str, args.seeds))}\n\n" + "\n".join(rows) + "\n")


def shipped_onnx(run_id: str, dst: Path) -> Path:
    """The ONNX file of a pipeline's shipped model: the int8 `model`, or the fp32 `model_onnx`."""
    client = mlflow.tracking.MlflowClient()
    names = [a.path for a in client.list_artifacts(run_id)]
    folder = "model_onnx" if "model_onnx" in names else "model"  # MLflow may keep weights beside the graph
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=folder,
                                                    dst_path=str(dst))) / "model.onnx"


def interleaved_latency(paths: dict[str, Path], example, rounds: int,
                        iters: int) -> dict[str, dict[str, float]]:
    """Median over `rounds` of each model's p50/p90, the models taking turns every round."""
    samples: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            samples[name].append(onnx_latency_ms(path, example, warmup=30, iters=iters, threads=1))
    return {name: {k: statistics.median(s[k] for s in runs) for k in ("p50_ms", "p90_ms")}
            for name, runs in samples.items()}


def stage_rows(run_id: str) -> list[dict]:
    """The evaluate stage's rows of one pipeline (one per model: stage, run_id, test/acc, ...), with
    each compressing stage's budget tags and metrics."""
    client = mlflow.tracking.MlflowClient()
    rows = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/tables/models.json"))
    for row in rows:
        run = client.get_run(row["run_id"])
        if "kdpipe.budget_met" in run.data.tags:
            row["budget"] = {"met": run.data.tags["kdpipe.budget_met"],
                             "kept": run.data.tags.get("kdpipe.budget_kept", "-"),
                             "val_drop": run.data.metrics.get("budget/shipped_drop_points")}
    return rows


def curve(run_id: str, metric: str) -> list[float]:
    """A stage run's per-epoch curve in %, read where it was trained (a reused stage points there)."""
    client = mlflow.tracking.MlflowClient()
    trained = client.get_run(run_id).data.tags.get("kdpipe.reused_from", run_id)
    return [100 * m.value for m in sorted(client.get_metric_history(trained, metric), key=lambda m: m.step)]


def plot_curves(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker=".", label=str(label))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val acc %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ladder(args: argparse.Namespace, uri: str) -> str:
    """Every rung for every seed; the accuracy table (mean ± std), the size/latency columns from the
    first seed's models, the budget table (per stage: val and test drop against the model entering
    it) and the fp32 student's validation curves."""
    base = base_overrides(args)
    acc: dict[str, list[float]] = {}
    rows: dict[str, dict[int, list[dict]]] = {}
    onnx_paths, first, t0 = {}, {}, time.time()
    wanted = set(args.rungs or RUNGS) | {"fp32 student"}  # the reference of every ratio
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for seed in args.seeds:
            for name, rung in RUNGS.items():
                if name not in wanted:
                    continue
                cfg = compose("config", overrides=[*base, *rung_overrides(rung, args), f"seed={seed}",
                                                   f"tracking.uri={uri}"])
                validate(cfg)
                folder = args.out / "runs" / f"seed{seed}" / name.replace(" ", "_").replace("%", "pc")
                metrics = run_pipeline(cfg, folder)
                run_id = mlflow.last_active_run().info.run_id
                acc.setdefault(name, []).append(100 * metrics["test/acc"])
                rows.setdefault(name, {})[seed] = stage_rows(run_id)
                if seed == args.seeds[0]:
                    first[name] = metrics
                    onnx_paths[name] = shipped_onnx(run_id, args.out / "models" / run_id)
                    example = instantiate(cfg.data).example_input(1)
    train_s = time.time() - t0
    lat = interleaved_latency(onnx_paths, example, args.rounds, args.iters)

    ref, ref_lat = first["fp32 student"], lat["fp32 student"]["p50_ms"]
    lines = ["| model | test acc % (mean ± std) | Δ acc (points) | bytes | × fp32 bytes | FLOPs "
             "| p50 ms (batch 1) | p90 ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in first.items():
        delta = [a - b for a, b in zip(acc[name], acc["fp32 student"], strict=True)]
        lines.append(
            f"| {name} | {mean_std(acc[name])} | {mean_std(delta, '+') if name != 'fp32 student' else ''} | "
            f"{int(m['model/size_bytes']):,} | {m['model/size_bytes'] / ref['model/size_bytes']:.3f} | "
            f"{m['model/flops'] / 1e6:.2f} M | {lat[name]['p50_ms']:.4f} | {lat[name]['p90_ms']:.4f} | "
            f"{ref_lat / lat[name]['p50_ms']:.2f}× |")
    budget = ["| rung | seed | stage | layers kept uncompressed | val drop (points) | test drop (points) "
              "| within budget on val / test |", "|---|---|---|---|---|---|---|"]
    for name, by_seed in rows.items():
        for seed, stages in by_seed.items():
            for before, row in zip(stages, stages[1:], strict=False):
                if "budget" not in row:
                    continue
                b, test_drop = row["budget"], 100 * (before["test/acc"] - row["test/acc"])
                budget.append(f"| {name} | {seed} | {row['stage']} | {b['kept']} | {b['val_drop']:.2f} | "
                              f"{test_drop:.2f} | {'yes' if b['met'] == 'true' else 'no'} / "
                              f"{'yes' if test_drop <= 1.0 else 'no'} |")
    curves = {seed: curve(next(r["run_id"] for r in stages if r["stage"] == "distill"), "val/acc")
              for seed, stages in rows["fp32 student"].items()}
    plot_curves({f"seed {s}": c for s, c in curves.items()}, args.out / "curves.png",
                "fp32 student: validation accuracy per epoch")
    tails = "; ".join(f"seed {s}: " + ", ".join(f"{v:.2f}" for v in c[-4:]) for s, c in curves.items())
    text = (f"compression ladder, {' '.join(base)}, seeds {', '.join(map(str, args.seeds))}\n"
            f"latency: ONNX Runtime CPU, 1 thread, batch 1, the first seed's models, median of {args.rounds} "
            f"interleaved rounds of {args.iters} calls; pipelines took {train_s:.0f} s\n"
            f"fp32 student val acc %, last 4 epochs: {tails}\n\n" + "\n".join(lines)
            + "\n\nbudgets (each stage against the model entering it):\n\n" + "\n".join(budget) + "\n")
    (args.out / "ladder.json").write_text(json.dumps(
        {"overrides": base, "seeds": args.seeds, "test_acc": acc, "first_seed_metrics": first,
         "latency": lat, "stages": rows, "val_curves": curves}, indent=2))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="fashion_mnist | digits (default: Fashion-MNIST if installed)")
    parser.add_argument("--student", default="cnn")
    parser.add_argument("--epochs", type=int, default=15, help="student (and --recovery teacher) epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="after each structured pruning step")
    parser.add_argument("--prune-steps", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=None, help="Fashion-MNIST images to train on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_compression"))
    parser.add_argument("--recovery", action="store_true",
                        help="also: fine-tuning after pruning on labels vs distilling")
    parser.add_argument("--teacher", nargs="*", default=[],
                        help="the recovery's teacher, e.g. teacher.checkpoint=PATH teacher.model.depth=4 "
                             "(one teacher for every seed; default: trained with each seed)")
    parser.add_argument("--ways", nargs="*", choices=tuple(WAYS), default=None,
                        help="the recovery's distilling ways (default both; labels always)")
    parser.add_argument("--no-ladder", action="store_true", help="only the recovery table")
    parser.add_argument("--rungs", nargs="*", default=None, help="run only these rungs of the ladder (names)")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KDPIPE_LOCK_DIR", str(args.out / "locks"))
    uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
    if not args.no_ladder:
        text = ladder(args, uri)
        print(text)
        (args.out / "ladder.md").write_text(text)
    if args.recovery:
        text = recovery(args, uri)
        print("\n" + text)
        (args.out / "recovery.md").write_text(text)


if __name__ == "__main__":
    main()

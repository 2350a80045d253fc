"""Compression ladder benchmark: fp32 student; + structured 50 %; + int8 static; + both; int8 under
an accuracy budget; the formats below int8 (int4 weight-only, 4-bit k-means, binary). And, with
`--recovery`, how much distilling recovers after pruning against plain fine-tuning.

Each rung is a real kdpipe pipeline against one MLflow store (so the student is trained once
and the structured pruning once, reused by the later rungs); accuracy, bytes and FLOPs are the
evaluate stage's numbers for the shipped model. Batch-1 latency of the four shipped models is
then measured again here, in one process, round-robin over several rounds (ONNX Runtime, CPU,
one thread), so the speed-ups compare like with like under the same machine load.

    python scripts/bench_compression.py                        # Fashion-MNIST if installed, else digits
    python scripts/bench_compression.py --data digits --epochs 10

Prints a Markdown table and writes it, with the raw numbers, under --out.
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

RUNGS = {
    "fp32 student": ["prune=none", "quantize=none"],
    "+ structured 50 %": ["prune=structured", "quantize=none"],
    "+ int8 static": ["prune=none", "quantize=static"],
    "+ structured 50 % + int8": ["prune=structured", "quantize=static"],
    "+ int8 static, budget 1 point": ["prune=none", "quantize=static", "compress.max_acc_drop=1.0"],
    "+ int4 weight-only (group 32)": ["prune=none", "quantize=int4"],
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
    """A teacher (cnn, width 32) distilled into the student by KD, pruned structured 60 % in one cut,
    then `--finetune-epochs` of fine-tuning each way of RECOVERY, seeds 0-2; test accuracy mean ± std
    of the last epoch."""
    data = args.data or ("fashion_mnist" if fashion_mnist_available() else "digits")
    base = [f"data={data}", "distill=kd", f"student={args.student}", "student.model.width=16",
            f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false", "quantize=none",
            "prune=structured", "prune.sparsity=0.6", f"prune.finetune.epochs={args.finetune_epochs}",
            "eval.latency_iters=20", "tracking.experiment=bench_recovery", f"tracking.uri={uri}"]
    if data == "fashion_mnist" and args.limit_train:
        base.append(f"data.limit_train={args.limit_train}")
    rows = ["| fine-tuning after pruning | test acc % (mean ± std, 3 seeds) | vs labels (points) |",
            "|---|---|---|"]
    accs: dict[str, list[float]] = {}
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for name, extra in RECOVERY.items():
            for seed in (0, 1, 2):
                cfg = compose("config", overrides=[*base, *extra, f"seed={seed}", *args.override])
                validate(cfg)
                folder = args.out / "recovery" / f"{name.replace(' ', '_')}-{seed}"
                accs.setdefault(name, []).append(100 * run_pipeline(cfg, folder)["test/acc"])
    ref = statistics.mean(accs["fine-tuned on labels"])
    for name, values in accs.items():
        m, sd = statistics.mean(values), statistics.stdev(values)
        rows.append(f"| {name} | {m:.2f} ± {sd:.2f} | {m - ref:+.2f} |")
    return (f"recovery after structured 60 % pruning, {args.finetune_epochs} fine-tuning epochs each, "
            f"{' '.join(base[:-1])}\n\n" + "\n".join(rows) + "\n")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="fashion_mnist | digits (default: Fashion-MNIST if installed)")
    parser.add_argument("--student", default="cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2, help="after each structured pruning step")
    parser.add_argument("--prune-steps", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=12000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_compression"))
    parser.add_argument("--recovery", action="store_true",
                        help="also: fine-tuning after pruning on labels vs distilling (3 seeds)")
    parser.add_argument("--rungs", nargs="*", default=None, help="run only these rungs of the ladder (names)")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KDPIPE_LOCK_DIR", str(args.out / "locks"))
    uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
    base = base_overrides(args)
    results, onnx_paths, t0 = {}, {}, time.time()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        wanted = set(args.rungs or RUNGS) | {"fp32 student"}  # the reference of every ratio
        rungs = {n: r for n, r in RUNGS.items() if n in wanted}
        for name, rung in rungs.items():
            cfg = compose("config", overrides=[*base, *rung_overrides(rung, args), f"tracking.uri={uri}"])
            validate(cfg)
            metrics = run_pipeline(cfg, args.out / "runs" / name.replace(" ", "_").replace("%", "pc"))
            run_id = mlflow.last_active_run().info.run_id
            results[name] = metrics
            onnx_paths[name] = shipped_onnx(run_id, args.out / "models" / run_id)
            example = instantiate(cfg.data).example_input(1)
    train_s = time.time() - t0
    lat = interleaved_latency(onnx_paths, example, args.rounds, args.iters)

    ref, ref_lat = results["fp32 student"], lat["fp32 student"]["p50_ms"]
    lines = ["| model | test acc | Δ acc (points) | bytes | × fp32 bytes | FLOPs | p50 ms (batch 1) "
             "| p90 ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(
            f"| {name} | {100 * m['test/acc']:.2f} % | {100 * (m['test/acc'] - ref['test/acc']):+.2f} | "
            f"{int(m['model/size_bytes']):,} | {m['model/size_bytes'] / ref['model/size_bytes']:.3f} | "
            f"{m['model/flops'] / 1e6:.2f} M | {lat[name]['p50_ms']:.4f} | {lat[name]['p90_ms']:.4f} | "
            f"{ref_lat / lat[name]['p50_ms']:.2f}× |")
    table = "\n".join(lines)
    header = (f"compression ladder, {' '.join(base)}\n"
              f"latency: ONNX Runtime CPU, 1 thread, batch 1, median of {args.rounds} interleaved rounds "
              f"of {args.iters} calls; pipelines took {train_s:.0f} s\n")
    print(header + "\n" + table)
    (args.out / "ladder.md").write_text(header + "\n" + table + "\n")
    (args.out / "ladder.json").write_text(json.dumps({"overrides": base, "metrics": results, "latency": lat},
                                                     indent=2))
    if args.recovery:
        text = recovery(args, uri)
        print("\n" + text)
        (args.out / "recovery.md").write_text(text)


if __name__ == "__main__":
    main()

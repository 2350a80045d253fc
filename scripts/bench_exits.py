"""The early-exit benchmark of docs/early_exits.md: a Fashion-MNIST student with two exits, trained
by the distill stage (scratch: labels, and each exit from the network's own final head), calibrated
on the validation split for `exits.max_acc_drop` points, and measured by the evaluate stage as it
ships (fp32 segments and int8 segments, batch 1, ONNX Runtime on one thread), against the same
network run to the end, in the same process. 3 seeds, mean ± std.

    python scripts/bench_exits.py                        # train (2 jobs at a time) and report
    python scripts/bench_exits.py --phases report        # the table and plots from the store
    python scripts/bench_exits.py --phases remeasure report   # latency again, in one process

`recalibrate --budget B` calibrates every seed's trained network again for another budget with the
evaluate stage's own function (`kdpipe.exits.evaluate.measure_exits`: segments exported and
quantized again, thresholds on the validation split, accuracy on test, batch-1 timing), without
training; its table is `recalibrated_<B>.md`.

`remeasure` times every seed's shipped pair again (full depth and exits, fp32 and int8) in this one
process, as the evaluate stage does (each sample's fastest of 5 calls through both, alternating),
for when the training jobs of the benchmark shared the machine with the stage's measurement; the
report then shows both.

Every run is a `kdpipe` command, printed before it starts, against `<workdir>/mlflow.db`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "bench_exits"


def command(args: argparse.Namespace, seed: int) -> list[str]:
    return ["data=fashion_mnist", "teacher=none", "distill=none", "student=cnn",
            f"student.model.width={args.width}", f"student.model.depth={args.depth}",
            f"student.exits=[{','.join(args.exits)}]", f"exits.max_acc_drop={args.budget}",
            f"trainer.max_epochs={args.epochs}", "prune=none", "quantize=static", f"seed={seed}",
            "trainer.enable_progress_bar=false", f"exits.latency_samples={args.latency_samples}",
            f"tracking.experiment={EXPERIMENT}", f"hydra.run.dir={args.workdir / f'seed{seed}'}",
            *args.override]


def run(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{args.workdir / 'mlflow.db'}",
           "KDPIPE_CHECKPOINT_DIR": str(args.workdir / "checkpoints")}

    def one(seed: int) -> int:
        cmd = command(args, seed)
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: kdpipe {' '.join(shlex.quote(c) for c in cmd)}",
              flush=True)
        with (args.workdir / f"seed{seed}.log").open("w") as out:
            rc = subprocess.run([sys.executable, "-m", "kdpipe", *cmd], cwd=args.workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, check=False).returncode
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: exit {rc}", flush=True)
        return rc

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(one, args.seeds))
    if any(codes):
        sys.exit(f"failed seeds: {[s for s, c in zip(args.seeds, codes, strict=True) if c]}")


PAIRS = {"distill": ("evaluate/distill.onnx", "evaluate/distill_exits"),
         "quantize": ("quantize/model.int8.onnx", "evaluate/quantize_exits")}


def remeasure(args: argparse.Namespace) -> None:
    from kdpipe.exits.runtime import ExitRuntime, batch1_latency

    dm, _ = fashion()
    images = np.concatenate([x.numpy() for x, _ in dm.test_dataloader()])[:args.latency_samples]
    out = {}
    for seed in args.seeds:
        for stage, (full, package) in PAIRS.items():
            root = args.workdir / f"seed{seed}"
            if (root / full).is_file() and (root / package / "policy.json").is_file():
                full_ms, exit_ms = batch1_latency(root / full, ExitRuntime.load(root / package), images)
                out[f"{seed}/{stage}"] = {"full_ms": full_ms, "exits_ms": exit_ms,
                                          "speedup": full_ms / exit_ms}
                print(f"seed {seed} {stage}: {full_ms:.4f} ms full, {exit_ms:.4f} ms with exits, "
                      f"{full_ms / exit_ms:.2f}x", flush=True)
    (args.workdir / "remeasured.json").write_text(json.dumps(out, indent=2))


def fashion():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from kdpipe.cli import CONFIG_PATH

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("config", overrides=["data=fashion_mnist", "quantize=static"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm, cfg


def recalibrate(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from kdpipe.exits.evaluate import measure_exits
    from kdpipe.models.io import load_model

    dm, cfg = fashion()
    exits_cfg = {**OmegaConf.to_container(cfg.exits, resolve=True), "max_acc_drop": args.budget,
                 "latency_samples": args.latency_samples}
    quantize = OmegaConf.to_container(cfg.quantize, resolve=True)
    rows = {}
    for seed in args.seeds:
        root = args.workdir / f"seed{seed}"
        net = load_model(root / "distill" / "model.pt")
        for stage, (full, _) in PAIRS.items():
            folder = root / f"recalibrated_{args.budget:g}" / stage
            m = measure_exits(net, root / full, dm, dm.example_input(2), folder, exits_cfg,
                              quantize if stage == "quantize" else None)
            rows.setdefault(stage, []).append(m)
            drop = 100 * (m["exits/full_test_acc"] - m["exits/test_acc"])
            print(f"seed {seed} {stage}: test drop {drop:.2f} "
                  f"points, {m['exits/speedup']:.2f}x", flush=True)
    lines = [f"exits.max_acc_drop={args.budget:g}, recalibrated without training (seeds {args.seeds})", "",
             "| segments | full-depth test acc % | with exits test acc % | drop on test (points) "
             "| drop on val (points) | leave early % | speed-up |", "|---|---|---|---|---|---|---|"]
    for stage, ms_rows in rows.items():
        col = {k: [r[k] for r in ms_rows] for k in ms_rows[0]}
        test_drop = [a - b for a, b in zip(col["exits/full_test_acc"], col["exits/test_acc"], strict=True)]
        val_drop = [a - b for a, b in zip(col["exits/full_val_acc"], col["exits/val_acc"], strict=True)]
        early = [1 - s for s in col["exits/share_final"]]
        label = "fp32" if stage == "distill" else "int8"
        lines.append(f"| {label} | {ms(col['exits/full_test_acc'], 100)} | "
                     f"{ms(col['exits/test_acc'], 100)} | {ms(test_drop, 100)} | {ms(val_drop, 100)} | "
                     f"{ms(early, 100, 1)} | {ms(col['exits/speedup'])}x |")
    text = "\n".join(lines) + "\n"
    (args.workdir / f"recalibrated_{args.budget:g}.md").write_text(text)
    print(text)


def ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    v = [scale * x for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.{digits}f} ± {sd:.{digits}f}"


def report(args: argparse.Namespace) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{args.workdir / 'mlflow.db'}")
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                              filter_string="attributes.status = 'FINISHED'")
    rows, curves = [], {}
    again = {}  # the remeasured speed-ups, per stage
    path = args.workdir / "remeasured.json"
    if path.is_file():
        found = json.loads(path.read_text())
        for stage in PAIRS:
            values = [v for k, v in found.items() if k.endswith(f"/{stage}")]
            if values:
                full = ms([v["full_ms"] for v in values], 1, 3)
                exits = ms([v["exits_ms"] for v in values], 1, 3)
                again[stage] = f"{full} / {exits} ms: **{ms([v['speedup'] for v in values])}x**"
    for stage, label in (("distill", "fp32"), ("quantize", "int8 (static, per segment)")):
        done = sorted((r for r in runs
                       if r.data.tags.get("kdpipe.stage") == stage and "exits/speedup" in r.data.metrics),
                      key=lambda r: r.info.start_time)
        if not done:
            continue
        m = [r.data.metrics for r in done]
        col = {k: [x[k] for x in m] for k in m[0] if k.startswith(("exits/", "test/"))}
        drop = [a - b for a, b in zip(col["exits/full_test_acc"], col["exits/test_acc"], strict=True)]
        flops = [a / b for a, b in zip(col["exits/full_flops"], col["exits/flops"], strict=True)]
        shares = " / ".join(ms(col[f"exits/share_{k}"], 100, 1) for k in ("0", "1", "final"))
        rows.append(f"| {label} | {ms(col['exits/full_test_acc'], 100)} | {ms(col['exits/test_acc'], 100)} | "
                    f"{ms(drop, 100)} | {shares} | {ms(flops)}x | "
                    f"{ms(col['exits/full_latency_ms'], 1, 3)} | {ms(col['exits/latency_ms'], 1, 3)} | "
                    f"**{ms(col['exits/speedup'])}x** (n={len(done)}) | {again.get(stage, '')} |")
        if stage == "distill":
            for r in done:
                hist = client.get_metric_history(r.info.run_id, "val/acc")
                seed = client.get_run(r.data.tags["mlflow.parentRunId"]).data.params.get("seed", "?")
                curves[seed] = [h.value for h in sorted(hist, key=lambda h: h.step)]
    header = ("| segments | full-depth test acc % | with exits test acc % | drop (points) "
              "| leave at exit 0 / exit 1 / end % | FLOPs saved | full ms/sample | exits ms/sample "
              "| speed-up | measured again alone: full / exits, speed-up |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    text = header + "\n" + "\n".join(rows) + "\n"
    (args.workdir / "report.md").write_text(text)
    print(text)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        for seed, acc in sorted(curves.items()):
            ax.plot(range(1, len(acc) + 1), [100 * a for a in acc], marker=".", label=f"seed {seed}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%), full depth")
        ax.set_title("early-exit student: validation accuracy per epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.workdir / "curves.png")
        plt.close(fig)
    seed0 = next((r for r in runs if r.data.tags.get("kdpipe.stage") == "quantize"
                  and "exits/speedup" in r.data.metrics), None)
    if seed0 is not None:
        local = mlflow.artifacts.download_artifacts(run_id=seed0.info.run_id,
                                                    artifact_path="exits/tradeoff.png",
                                                    dst_path=str(args.workdir / "dl"))
        shutil.copy(local, args.workdir / "tradeoff.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_exits")
    ap.add_argument("--phases", nargs="+", choices=["run", "recalibrate", "remeasure", "report"],
                    default=["run", "report"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--exits", nargs="+", default=["features.1", "features.2"])
    ap.add_argument("--budget", type=float, default=0.5, help="exits.max_acc_drop, points")
    ap.add_argument("--latency-samples", type=int, default=1000)
    ap.add_argument("--override", nargs="*", default=[], help="more kdpipe overrides")
    args = ap.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if "run" in args.phases:
        run(args)
    if "recalibrate" in args.phases:
        recalibrate(args)
    if "remeasure" in args.phases:
        remeasure(args)
    if "report" in args.phases:
        report(args)


if __name__ == "__main__":
    main()

"""Where the wall time of `kdpipe` with no arguments goes.

Runs the default pipeline (digits: teacher, distill, prune + fine-tune, static int8, evaluate)
in a fresh temp dir with a fresh SQLite store, as `python -m kdpipe` would, `--repeats` times
(the user's KDPIPE_CACHE_DIR is kept, as a second run on a machine sees it; `--cold-cache` not),
and prints one row per phase (median over the repeats): the stage runs' start and end times are
read back from the MLflow store; what happens outside them, and the parts of each stage
(Lightning fits, ONNX exports, ORT quantization, latency loops, `log_model` calls, ...), is timed
in the child process by wrapping those functions (the wrappers only read the clock).

    python scripts/bench_default_run.py                  # one run
    python scripts/bench_default_run.py --repeats 3      # medians of three
    python scripts/bench_default_run.py -- trainer.max_epochs=2   # overrides go to kdpipe
    python scripts/bench_default_run.py --torch-threads 1 --gc-freeze-at-exit   # what if (see --help)

Run it with the repository on PYTHONPATH (or kdpipe installed). Imports of the first export
(torch.onnx's exporter, onnxscript) are counted in that export, as in a real run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# (module, attribute, label): functions timed in the child. A function also bound under its name
# in other kdpipe modules (`from x import f`) is wrapped there too.
TIMED = [
    ("kdpipe.overrides", "check", "override check"),
    ("kdpipe.tracking.store", "setup_tracking", "tracking store setup (SQLite create + migrations)"),
    ("kdpipe.data.base", "TensorDataModule.setup", "data module setup"),
    ("pytorch_lightning", "Trainer.fit", "Lightning fit"),
    ("kdpipe.distill.cache", "compute_logits", "teacher logits for the cache"),
    ("kdpipe.export", "export_onnx", "ONNX export (torch.onnx dynamo)"),
    ("kdpipe.compress.quantize", "quantize_static_int8", "ORT static int8 quantization"),
    ("kdpipe.metrics.measure", "torch_logits", "test-set inference"),
    ("kdpipe.metrics.measure", "onnx_logits", "test-set inference"),
    ("kdpipe.metrics.measure", "onnx_latency_ms", "latency + throughput loops"),
    ("kdpipe.metrics.measure", "flops_per_sample", "FLOP count"),
    ("kdpipe.report.plots", "accuracy_vs_size", "accuracy-vs-size plot"),
    ("kdpipe.stages.evaluate", "write_tables", "model tables"),
    ("mlflow.onnx", "log_model", "mlflow.onnx.log_model"),
    ("mlflow.pytorch", "log_model", "mlflow.pytorch.log_model"),
    ("mlflow.models.signature", "_infer_signature_from_input_example", "  of which signature inference"),
    ("kdpipe.report.summary", "print_summary", "summary table"),
]
STAGES = ("teacher", "distill", "prune", "quantize", "evaluate")


# ------------------------------------------------------------------------------------ child side
def _wrap(calls: list, label: str, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append((label, t0, time.time()))
    return timed


def _install(calls: list) -> None:
    import importlib

    for mod_name, attr, label in TIMED:
        mod = importlib.import_module(mod_name)
        owner_name, _, fn_name = attr.rpartition(".")
        owner = getattr(mod, owner_name) if owner_name else mod
        original = getattr(owner, fn_name)
        wrapped = _wrap(calls, label, original)
        setattr(owner, fn_name, wrapped)
        if owner_name:
            continue
        for name, other in list(sys.modules.items()):  # `from mod import fn` elsewhere
            if name.startswith(("kdpipe", "mlflow")) and getattr(other, fn_name, None) is original:
                setattr(other, fn_name, wrapped)


def child(out: Path, argv: list[str], threads: int | None, gc_freeze: bool, gc_imports: bool) -> None:
    import gc

    marks = {"start": float(os.environ["BENCH_T0"])}
    calls: list = []
    if gc_imports:
        gc.disable()
    import kdpipe.cli
    import kdpipe.pipeline  # noqa: F401  (imported by the CLI after composing; here first, to time it)

    if gc_imports:  # the modules' objects live to the end: out of every later collection
        gc.freeze()
        gc.enable()

    if threads:
        import torch

        torch.set_num_threads(threads)

    marks["imported"] = time.time()
    _install(calls)
    run_pipeline = kdpipe.pipeline.run_pipeline

    def timed_pipeline(*args, **kwargs):
        marks["pipeline_start"] = time.time()
        try:
            return run_pipeline(*args, **kwargs)
        finally:
            marks["pipeline_end"] = time.time()

    kdpipe.pipeline.run_pipeline = timed_pipeline
    sys.argv = ["kdpipe", *argv]
    try:
        kdpipe.cli.entry()
    finally:
        marks["end"] = time.time()
        out.write_text(json.dumps({"marks": marks, "calls": calls}))
        if gc_freeze:  # what is left is the interpreter's teardown, mostly garbage collection
            gc.freeze()


# ----------------------------------------------------------------------------------- parent side
def store_runs(db: Path) -> dict[str, tuple[float, float]]:
    """name -> (start, end) in seconds since the epoch; the parent run under `pipeline`."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT r.name, r.start_time, r.end_time, t.value FROM runs r LEFT JOIN tags t "
                           "ON t.run_uuid = r.run_uuid AND t.key = 'kdpipe.run_type'").fetchall()
    finally:
        con.close()
    out = {}
    for name, start, end, run_type in rows:
        out["pipeline" if run_type == "pipeline" else name] = (start / 1e3, (end or start) / 1e3)
    return out


def breakdown(result: dict, runs: dict[str, tuple[float, float]], wall: float) -> dict[str, float]:
    """Seconds per phase of one run; `  ` rows are parts of the row above them."""
    m, calls = result["marks"], result["calls"]
    rows: dict[str, float] = {}
    inside = defaultdict(lambda: defaultdict(float))  # stage -> label -> seconds

    def where(t0: float) -> str:
        for stage in STAGES:
            if stage in runs and runs[stage][0] <= t0 <= runs[stage][1] + 1e-3:
                return stage
        p0, p1 = runs["pipeline"]
        if t0 < p0:
            return "before"
        return "in pipeline run" if t0 <= p1 + 1e-3 else "after"

    nested = {}  # a label nested in another call (signature inference inside log_model) is a part
    for label, t0, t1 in calls:
        inside[where(t0)][label] += t1 - t0
        nested.setdefault(label, label.startswith("  "))

    def parts(group: str, where: str) -> None:
        for label, sec in inside.get(group, {}).items():
            rows[f"    {label.strip()} ({where})" if nested[label] else f"  {label} ({where})"] = sec

    rows["interpreter start + imports (torch, Lightning, MLflow, ONNX, kdpipe)"] = m["imported"] - m["start"]
    before = inside.get("before", {})
    check = before.get("override check", 0.0)
    setup = before.get("tracking store setup (SQLite create + migrations)", 0.0)
    data = before.get("data module setup", 0.0)
    rows["override check"] = check
    rows["Hydra compose + validate"] = m["pipeline_start"] - m["imported"] - check
    p0, p1 = runs["pipeline"]
    rows["tracking store setup (SQLite create + migrations)"] = setup
    rows["data module setup"] = data
    rows["pipeline run start (params, config artefact)"] = p0 - m["pipeline_start"] - setup - data
    prev = p0
    for stage in STAGES:
        if stage not in runs:
            continue
        s0, s1 = runs[stage]
        rows["between stage runs (lock, reuse query)"] = (
            rows.get("between stage runs (lock, reuse query)", 0.0) + (s0 - prev)
        )
        rows[f"stage {stage}"] = s1 - s0
        parts(stage, stage)
        prev = s1
    rows["after evaluate, in the pipeline run"] = p1 - prev
    parts("in pipeline run", "pipeline")
    rows["pipeline run end -> exit (summary, teardown)"] = m["end"] - p1
    parts("after", "end")
    rows["interpreter exit"] = wall - (m["end"] - m["start"])
    rows["TOTAL wall"] = wall
    return rows


def run_once(argv: list[str], keep: bool, cold_cache: bool, what_if: list[str]) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-bench-"))
    env = dict(os.environ, KDPIPE_CHECKPOINT_DIR=str(tmp / "checkpoints"), KDPIPE_LOCK_DIR=str(tmp / "locks"))
    if cold_cache:  # no schema template, no cached statistics: a first run on this machine
        env["KDPIPE_CACHE_DIR"] = str(tmp / "cache")
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: sqlite:///mlflow.db in the working dir
    out = tmp / "bench.json"
    env["BENCH_T0"] = repr(time.time())
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(out), *what_if,
                           "--", *argv],
                          cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"kdpipe failed (exit {proc.returncode}) in {tmp}:\n{proc.stdout[-4000:]}")
    rows = breakdown(json.loads(out.read_text()), store_runs(tmp / "mlflow.db"), wall)
    if not keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (store, outputs)")
    ap.add_argument("--cold-cache", action="store_true",
                    help="a fresh KDPIPE_CACHE_DIR per run (else the user's, as a real run sees it)")
    ap.add_argument("--json", type=Path, help="also write every run's rows here")
    ap.add_argument("--torch-threads", type=int, help="what if: torch.set_num_threads(N) before the run")
    ap.add_argument("--gc-freeze-at-exit", action="store_true",
                    help="what if: gc.freeze() once the run is done")
    ap.add_argument("--gc-off-during-imports", action="store_true",
                    help="what if: gc.disable() while importing, then gc.freeze(); gc.enable()")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="kdpipe overrides (after --)")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.overrides, args.torch_threads, args.gc_freeze_at_exit,
              args.gc_off_during_imports)
        return
    what_if = ([f"--torch-threads={args.torch_threads}"] if args.torch_threads else []) + \
        (["--gc-freeze-at-exit"] if args.gc_freeze_at_exit else []) + \
        (["--gc-off-during-imports"] if args.gc_off_during_imports else [])
    runs = []
    for i in range(args.repeats):
        runs.append(run_once(args.overrides, args.keep, args.cold_cache, what_if))
        print(f"run {i + 1}/{args.repeats}: {runs[-1]['TOTAL wall']:.1f} s wall", file=sys.stderr, flush=True)
    labels = list(dict.fromkeys(label for rows in runs for label in rows))
    width = max(len(label) for label in labels)
    print(f"kdpipe {' '.join(args.overrides)}".rstrip()
          + f"  {' '.join(what_if)}  ({args.repeats} run(s), {os.cpu_count()} CPUs; "
          "median seconds" + (", min-max" if args.repeats > 1 else "") + ")")
    for label in labels:
        values = [rows.get(label, 0.0) for rows in runs]
        spread = f"  ({min(values):6.2f} - {max(values):6.2f})" if args.repeats > 1 else ""
        print(f"{label:<{width}}  {statistics.median(values):7.2f}{spread}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()

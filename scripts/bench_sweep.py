"""Benchmark: a 4-point temperature sweep (`experiment=temperature_sweep`) three ways, each the real
`kdpipe -m` command against its own fresh SQLite store:

  sequential + reuse   basic launcher, stage reuse on (the default): one teacher, 4 students
  parallel + reuse     hydra/launcher=joblib with --jobs workers
  sequential, no reuse reuse=false: the teacher is trained again in every job

The cost the sweep cannot avoid is one teacher + 4 students, each evaluated: `ideal` is the sum of
the durations (MLflow start/end) of the teacher run that trained and of the distill and evaluate
runs of the sequential sweep. Target: the sequential sweep with reuse costs at most 1.1x that
(sum of its pipeline runs / ideal). Wall times include process start-up (imports) and the sweep
report. CPU is the user+sys time of the command and its workers, less sensitive than wall time to
other load on a shared machine. Ratios come from one run: read them as noisy.

    python scripts/bench_sweep.py [--epochs 2] [--jobs 2] [--data digits]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
TEMPERATURES = "1,2,4,8"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sweep(extra: list[str], epochs: int, data: str) -> tuple[float, float, list]:
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "KDPIPE_LOCK_DIR": f"{tmp}/locks",
               "KDPIPE_CHECKPOINT_DIR": f"{tmp}/checkpoints",  # never resume another run's fit
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("KDPIPE_SWEEP", None)
        cmd = [sys.executable, "-m", "kdpipe", "-m", "experiment=temperature_sweep", f"data={data}",
               f"distill.temperature={TEMPERATURES}", f"trainer.max_epochs={epochs}",
               "trainer.enable_progress_bar=false", *extra]
        start, cpu = time.perf_counter(), _children_cpu()
        res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
        if res.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=["temperature_sweep"], output_format="list")
        return wall, cpu, runs


def seconds(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data", default="digits")
    args = parser.parse_args()

    modes = {
        "sequential + reuse": [],
        "parallel + reuse": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"],
        "sequential, no reuse": ["reuse=false"],
    }
    results = {}
    for name, extra in modes.items():
        wall, cpu, runs = run_sweep(extra, args.epochs, args.data)
        pipelines = [r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline"]
        teachers = [r for r in runs if r.data.tags.get("kdpipe.stage") == "teacher"]
        trained = [t for t in teachers if "kdpipe.reused_from" not in t.data.tags]
        assert len(pipelines) == 4 and all(r.info.status == "FINISHED" for r in runs), name
        results[name] = {"wall": wall, "cpu": cpu, "pipelines": sum(seconds(p) for p in pipelines),
                         "teachers_trained": len(trained), "runs": runs,
                         "teacher_s": sum(seconds(t) for t in trained)}
        print(f"{name:22s} wall {wall:7.1f} s   CPU {cpu:7.1f} s   "
              f"sum of pipeline runs {results[name]['pipelines']:7.1f} s   "
              f"teachers trained {len(trained)} ({results[name]['teacher_s']:.1f} s)", flush=True)

    seq = results["sequential + reuse"]
    by_stage = {}
    for r in seq["runs"]:
        by_stage.setdefault(r.data.tags.get("kdpipe.stage"), []).append(seconds(r))
    ideal = seq["teacher_s"] + sum(by_stage.get("distill", [])) + sum(by_stage.get("evaluate", []))
    print(f"\nideal (1 teacher {seq['teacher_s']:.1f} s + 4 students {sum(by_stage['distill']):.1f} s "
          f"+ 4 evaluations {sum(by_stage['evaluate']):.1f} s) = {ideal:.1f} s")
    print(f"sweep with reuse / ideal (sum of pipeline runs):   {seq['pipelines'] / ideal:.2f}x  "
          f"(target <= 1.1x)")
    print(f"sweep with reuse / ideal (wall, incl. start-up):   {seq['wall'] / ideal:.2f}x")
    no_reuse = results["sequential, no reuse"]
    print(f"no reuse / reuse (wall):                           {no_reuse['wall'] / seq['wall']:.2f}x")
    print(f"no reuse / reuse (CPU, robust to a busy machine):  {no_reuse['cpu'] / seq['cpu']:.2f}x")
    print(f"parallel ({args.jobs} jobs) / sequential (wall):           "
          f"{results['parallel + reuse']['wall'] / seq['wall']:.2f}x")


if __name__ == "__main__":
    main()

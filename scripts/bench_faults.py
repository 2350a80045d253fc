"""The kill matrix, measured: the real `kdpipe` command killed at each point, then run again.

For each signal (SIGKILL, SIGTERM) a chain of jobs runs the same command on its own store: the
first is killed at the start of the teacher stage, the next (which must reuse what the first
finished) at the start of distill, and so on through prune, quantize, evaluate and the final
model logging; a last job runs to the end. The kill lands through `KDPIPE_FAULT_INJECT`: the
process sends itself the real signal at that point. The table gives, per kill: the exit code and
wall time; per chain: the runs left RUNNING after the last job (goal 0), the pipeline runs
ended KILLED, and the stages computed more than once (a finished stage recomputed: goal 0).
Both chains run at once (they share nothing); exits 1 if any goal is missed.

    python scripts/bench_faults.py
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POINTS = ["stage-teacher", "stage-distill", "stage-prune", "stage-quantize", "stage-evaluate", "log-model"]
TRAINED = ["teacher", "distill", "prune", "quantize"]  # evaluate measures afresh on every run
# Tiny but real: all five stages (static int8 included) on synthetic data.
ARGS = ["data=synthetic", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "teacher.model.width=8", "student.model.width=4", "eval.latency_iters=10", "eval.latency_warmup=2",
        "export.onnx=false"]


def kill_chain(root: Path, sig: str, args: list[str] = ARGS,
               points: list[str] = POINTS) -> list[tuple[str, int, str, float]]:
    """Kill the same command at each of `points` in turn, then let it finish, in `root` (its own
    store and lock folder). Returns (point, exit code, stderr, seconds) per job."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "KDPIPE_LOCK_DIR": str(root / "locks"), "PYTHONPATH": str(REPO)}
    results = []
    for point in [*points, None]:
        env["KDPIPE_FAULT_INJECT"] = f"{point}:{sig}" if point else ""
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "kdpipe", *args], cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
        results.append((point or "none", res.returncode, res.stderr, time.perf_counter() - start))
    return results


def store_runs(db: Path) -> list[tuple[str, str | None, str | None, str | None]]:
    """(status, kdpipe.run_type, kdpipe.stage, kdpipe.reused_from) of every run, read with sqlite3."""
    with sqlite3.connect(db) as con:
        return con.execute("""
            SELECT r.status, t1.value, t2.value, t3.value FROM runs r
            LEFT JOIN tags t1 ON t1.run_uuid = r.run_uuid AND t1.key = 'kdpipe.run_type'
            LEFT JOIN tags t2 ON t2.run_uuid = r.run_uuid AND t2.key = 'kdpipe.stage'
            LEFT JOIN tags t3 ON t3.run_uuid = r.run_uuid AND t3.key = 'kdpipe.reused_from'
        """).fetchall()


def computed_stages(runs) -> dict[str, int]:
    """How many times each trained stage was computed (FINISHED and not reused): 1 is the goal."""
    return {s: sum(1 for r in runs if r[2] == s and r[0] == "FINISHED" and r[3] is None) for s in TRAINED}


def run_both(root: Path, points: dict[str, list[str]] | None = None) -> dict[str, tuple[Path, list]]:
    """Both chains at once, each killed at `points[signal]` (default: every point)."""
    points = points or {}
    with ThreadPoolExecutor(2) as pool:
        futures = {sig: pool.submit(kill_chain, root / sig, sig, ARGS, points.get(sig, POINTS))
                   for sig in ("SIGKILL", "SIGTERM")}
        return {sig: (root / sig, f.result()) for sig, f in futures.items()}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        chains = run_both(Path(tmp))
        ok = True
        print("| signal | killed at | exit | seconds |\n|---|---|---|---|")
        for sig, (_, results) in chains.items():
            for point, code, _, seconds in results:
                print(f"| {sig} | {point} | {code} | {seconds:.1f} |")
        print("\n| signal | kills | last job exit | runs RUNNING after | pipeline runs KILLED | "
              "stages computed (teacher, distill, prune, quantize) | finished stages recomputed |")
        print("|---|---|---|---|---|---|---|")
        for sig, (root, results) in chains.items():
            runs = store_runs(root / "mlflow.db")
            running = sum(1 for r in runs if r[0] == "RUNNING")
            killed = sum(1 for r in runs if r[1] == "pipeline" and r[0] == "KILLED")
            computed = computed_stages(runs)
            recomputed = sum(n - 1 for n in computed.values() if n > 1)
            last = results[-1][1]
            ok &= running == 0 and recomputed == 0 and last == 0 and all(n == 1 for n in computed.values())
            print(f"| {sig} | {len(results) - 1} | {last} | {running} | {killed} | "
                  f"{', '.join(str(n) for n in computed.values())} | {recomputed} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

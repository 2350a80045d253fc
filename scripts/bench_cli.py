"""Benchmark: how fast the real `kdpipe` command rejects bad input, and that it does.

Each input of the README's list is given to `python -m kdpipe` in a fresh temporary directory
(its own SQLite store, so nothing is written anywhere else), `--repeat` times; the table shows the
exit code, the median and fastest wall time, and the first line on stderr. Target: each input is
refused in under 2 s of wall time (the check runs before torch, Lightning and MLflow are
imported). Wall times on a shared machine are noisy; the interpreter's own start-up is the first
row, for scale.

Exits 1 when an input is NOT rejected (exit code other than 2, or no `kdpipe: error:` line): that
is a correctness failure, not a timing one. An input that is accepted would start training, so it
is stopped after `--timeout` seconds and counted as not rejected.

    python scripts/bench_cli.py [--repeat 5] [--timeout 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kdpipe.report.tables import markdown_table  # noqa: E402

TARGET_S = 2.0
# (what is wrong, the arguments): the bad inputs the README lists, and a bad value inside a sweep.
BAD_INPUTS = [
    ("negative temperature", ["distill.temperature=-1"]),
    ("temperature nan", ["distill.temperature=nan"]),
    ("alpha above 1", ["distill.alpha=1.5"]),
    ("sparsity above 1", ["prune.sparsity=1.5"]),
    ("no calibration batch", ["quantize.calibration.num_batches=0"]),
    ("bad value in a sweep", ["-m", "distill.temperature=1,2,-4"]),
    ("misspelled key", ["distill.temprature=4"]),
    ("unknown option", ["distill=kdd"]),
    ("wrongly typed value", ["distill.temperature=hot"]),
]


def run(args: list[str], timeout: float) -> tuple[float, int | None, str]:
    """(wall seconds, exit code or None on timeout, first stderr line) of `python -m kdpipe args`."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-cli-") as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "KDPIPE_LOCK_DIR": f"{tmp}/locks",
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        start = time.perf_counter()
        try:
            res = subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            return time.perf_counter() - start, None, f"still running after {timeout:g} s: not rejected"
        wall = time.perf_counter() - start
    lines = res.stderr.strip().splitlines()
    return wall, res.returncode, lines[0] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per input (the median is reported)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds before an input counts as accepted")
    opts = parser.parse_args(argv)

    rows, failed = [], []
    startup = [run(["-c", "pass"], opts.timeout)[0] for _ in range(opts.repeat)]
    rows.append(["python start-up (`python -c pass`)", "", "0", f"{statistics.median(startup):.2f}",
                 f"{min(startup):.2f}", ""])
    for what, args in BAD_INPUTS:
        walls = []
        for _ in range(opts.repeat):
            wall, code, first = run(["-m", "kdpipe", *args], opts.timeout)
            walls.append(wall)
            rejected = code == 2 and first.startswith("kdpipe: error:")
            if not rejected:
                failed.append(f"{' '.join(args)}: exit {code}, {first!r}")
                break
        median = statistics.median(walls)
        mark = "" if median < TARGET_S else " (over target)"
        shown = first if len(first) <= 100 else first[:97] + "..."
        rows.append([what, f"`kdpipe {' '.join(args)}`", str(code), f"{median:.2f}{mark}",
                     f"{min(walls):.2f}", shown.replace("|", "\\|")])
    print(f"Rejecting bad input, {opts.repeat} runs each, wall seconds (target < {TARGET_S:g} s; "
          f"a shared machine is noisy):\n")
    print(markdown_table(["input", "command", "exit", "median s", "min s", "first line on stderr"], rows))
    if failed:
        print("NOT rejected:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

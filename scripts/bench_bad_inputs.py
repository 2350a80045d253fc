"""Benchmark: the table of bad inputs (`tests/bad_inputs.py`) through the real `kdpipe` command.

Writes the table's broken files into a temporary folder, runs each row's command in its own empty
directory (its own SQLite store), and prints one line per row (exit code, wall seconds, whether it
was rejected cleanly: exit 2, one `kdpipe: error:` line holding the expected key and fix, no
traceback, nothing left in the directory), then the count, how many were rejected cleanly and the
median seconds to reject. Rows about read-only or full file systems need `unshare -rm` (a private
user+mount namespace) and are skipped without it; `--skip-torch` leaves out the row whose check
imports torch (about 2 s).

    python scripts/bench_bad_inputs.py [--repeat 1] [--skip-torch]

Exits 1 when a row is not rejected cleanly.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

from tests.bad_inputs import ROWS, make_data, problems, run_row, unshare_works  # noqa: E402
from tests.conftest import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (its median is used)")
    parser.add_argument("--skip-torch", action="store_true", help="leave out rows whose check imports torch")
    opts = parser.parse_args(argv)

    mount = unshare_works()
    rows = [r for r in ROWS if (mount or not r.mount) and not (opts.skip_torch and r.needs_torch)]
    skipped = [r.id for r in ROWS if r not in rows]
    medians, clean, failed = [], 0, []
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-bad-") as tmp:
        data = make_data(Path(tmp) / "data")
        for i, row in enumerate(rows):
            walls, found = [], []
            for j in range(opts.repeat):
                cwd, mnt = Path(tmp) / f"cwd-{i}-{j}", Path(tmp) / f"mnt-{i}-{j}"
                cwd.mkdir()
                mnt.mkdir()
                res, seconds = run_row(row, data, cwd, mnt, run_cli)
                walls.append(seconds)
                found += problems(row, data, res, cwd, mnt)
            medians.append(statistics.median(walls))
            clean += not found
            first = (res.stderr.strip().splitlines() or [""])[0]
            print(f"{row.id:32s} exit {res.returncode}  {medians[-1]:5.2f} s  "
                  f"{'clean' if not found else 'NOT CLEAN'}  {first[:110]}", flush=True)
            if found:
                failed.append(f"{row.id}: {found[0]}")
    fast = [m for r, m in zip(rows, medians, strict=True) if not r.needs_torch]
    print(f"\n{len(rows)} rows, {clean} rejected cleanly, median {statistics.median(medians):.2f} s "
          f"to reject (before torch: {len(fast)} rows, median {statistics.median(fast):.2f} s, "
          f"max {max(fast):.2f} s)")
    if skipped:
        print(f"skipped: {', '.join(skipped)}" + ("" if mount else " (`unshare -rm true` fails here)"))
    if failed:
        print("NOT rejected cleanly:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

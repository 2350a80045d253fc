"""`kdpipe-report EXPERIMENT [--sweep TAG]`: the sweep report of runs already in the store."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mlflow

from kdpipe.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdpipe-report",
        description="Tables (markdown, CSV; mean ± std over seeds) and plots (accuracy against temperature, "
                    "size and latency with the Pareto front) of the pipeline runs of an experiment.")
    parser.add_argument("experiment", help="MLflow experiment name (tracking.experiment), e.g. kdpipe")
    parser.add_argument("--sweep",
                        help="only the runs with this kdpipe.sweep tag (a multirun's sweep directory)")
    parser.add_argument("--out", type=Path, help="folder for the files (default: reports/<experiment>)")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--no-log", action="store_true", help="write the files only; log no summary run")
    args = parser.parse_args(argv)

    mlflow.set_tracking_uri(args.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    from kdpipe.report.sweep import build_report

    folder = args.out or Path("reports") / args.experiment
    try:
        report = build_report(args.experiment, args.sweep, folder, log=not args.no_log)
    except ConfigError as exc:
        print(f"kdpipe-report: error: {exc}", file=sys.stderr)
        return 2
    print((folder / "summary.md").read_text())
    for path in report.files:
        print(f"wrote {path}")
    if report.run_id:
        print(f"logged as run {report.run_id} (run name sweep-report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

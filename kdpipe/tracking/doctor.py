"""`kdpipe-doctor`: find the runs a killed job left RUNNING, and mark them KILLED.

Every kdpipe job already does this for its own host as it starts (`kdpipe.faults.reap_orphans`).
The doctor shows the state of a whole store, whoever wrote to it, and repairs on demand: runs of
this host whose owner process is gone, and with `--host` the runs of a machine you know is gone
(a store shared by a cluster: a job cannot see another host's processes).

    kdpipe-doctor                          # list RUNNING runs with their owner's state
    kdpipe-doctor --repair                 # mark the dead ones KILLED
    kdpipe-doctor --repair --host node17   # node17 crashed: its RUNNING runs are dead too
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from kdpipe.faults import HOST_TAG, PID_TAG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdpipe-doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None,
                        help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--repair", action="store_true", help="mark runs whose owner is gone KILLED")
    parser.add_argument("--host", action="append", default=[],
                        help="a host known to be gone: its RUNNING runs count as dead (repeatable)")
    args = parser.parse_args(argv)

    import mlflow
    from mlflow.tracking import MlflowClient

    from kdpipe.faults import orphan_runs

    if args.store:
        mlflow.set_tracking_uri(args.store)
    try:
        runs = orphan_runs(all_hosts=True)
    except Exception as exc:
        print(f"kdpipe-doctor: error: cannot read {mlflow.get_tracking_uri()}: {exc}", file=sys.stderr)
        return 2
    client = MlflowClient()
    repaired = 0
    counts = {"alive": 0, "dead": 0, "unknown": 0}
    for run, state in runs:
        host = run.data.tags.get(HOST_TAG, "?")
        if state == "unknown" and host in args.host:
            state = "dead"
        counts[state] += 1
        started = dt.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
        action = ""
        if state == "dead" and args.repair:
            client.set_terminated(run.info.run_id, "KILLED")
            repaired += 1
            action = " -> KILLED"
        print(f"{run.info.run_id}  {run.info.run_name or '-':<12} started {started}  "
              f"host {host} pid {run.data.tags.get(PID_TAG, '?')}: owner {state}{action}")
    hint = "" if args.repair or not counts["dead"] else "; --repair marks them"
    print(f"{len(runs)} RUNNING run(s): {counts['alive']} alive, {counts['dead']} dead, "
          f"{counts['unknown']} of other hosts (pass --host NAME for a host that is gone); "
          f"{repaired} marked KILLED{hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

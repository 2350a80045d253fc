"""`kdpipe-ui`: the MLflow UI (an `mlflow server` process) on the project's store.

The same process is the tracking server of `tracking=server`: it owns its backend store and
artefact root, and jobs talk to it over HTTP, so many parallel writers never share a SQLite file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys


def server_command(store: str, host: str, port: int, artifacts: str | None = None) -> list[str]:
    mlflow_bin = shutil.which("mlflow")
    cmd = [mlflow_bin] if mlflow_bin else [sys.executable, "-m", "mlflow"]
    cmd += ["server", "--backend-store-uri", store, "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts:
        cmd += ["--artifacts-destination", artifacts]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdpipe-ui", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db",
                        help="backend store URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db, "
                             "the store kdpipe writes by default)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1: only this machine can connect")
    parser.add_argument("--artifacts", help="artefact root for runs created through this server "
                                            "(tracking=server), e.g. ./mlartifacts")
    args = parser.parse_args(argv)
    if args.store.startswith(("http://", "https://")):
        print(f"kdpipe-ui: error: {args.store} is already a tracking server: open it in a browser",
              file=sys.stderr)
        return 2
    cmd = server_command(args.store, args.host, args.port, args.artifacts)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {args.store}); Ctrl-C stops it", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

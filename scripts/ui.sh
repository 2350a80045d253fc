#!/usr/bin/env bash
# Open the MLflow UI on the project's store: scripts/ui.sh [--port 5000] [--store sqlite:///mlflow.db]
# Run it from the directory you launched kdpipe from (the store is ./mlflow.db there).
set -euo pipefail
exec python -m kdpipe.tracking.ui "$@"

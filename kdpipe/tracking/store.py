"""The tracking store as kdpipe uses it.

Names users see (stable, dashboards depend on them): tag `kdpipe.stage` on every stage run,
`kdpipe.cache_key` on every stage run, `kdpipe.reused_from` where a stage was reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param, Run
from mlflow.tracking import MlflowClient

STAGE_TAG = "kdpipe.stage"
CACHE_KEY_TAG = "kdpipe.cache_key"
REUSED_FROM_TAG = "kdpipe.reused_from"
ARTIFACT_TAG = "kdpipe.artifact"  # set last, only once a stage's model artefact is stored
RUN_TYPE_TAG = "kdpipe.run_type"  # "pipeline" on the parent run, "stage" on its children


def setup_tracking(uri: str | None, experiment: str, artifact_location: str | None = None) -> str:
    """Point MLflow at `uri` (MLflow's own default when None) and select `experiment`,
    creating it (with `artifact_location` if given) when missing. Returns the experiment id."""
    if uri:
        mlflow.set_tracking_uri(uri)
    # A new SQLite store is created by migrating an empty file: two jobs starting at once on one
    # store must not both migrate it (the second fails), so the first access is serialised.
    with stage_lock("store-init"):
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:  # another job created it first
                exp_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"distill": {"temperature": 4}}` -> `{"distill.temperature": 4}`; lists are kept as
    their JSON text so they stay one comparable value."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def log_flat_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in batches of 100 (MLflow's per-request limit)."""
    client = MlflowClient()
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def cache_key(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (stage config, data config, seed, upstream keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def find_reusable_run(key: str) -> Run | None:
    """The newest FINISHED stage run with this cache key that holds its model artefact."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{CACHE_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    for run in runs:
        if run.data.tags.get(ARTIFACT_TAG):
            return run
    return None


@contextlib.contextmanager
def stage_lock(key: str) -> Iterator[None]:
    """An exclusive, machine-wide lock per cache key (flock on a file in the temp dir), so two
    jobs of a parallel sweep never compute the same stage twice: the second waits, then
    finds the first one's finished run and reuses it. The OS drops the lock if a job dies."""
    lock_dir = Path(os.environ.get("KDPIPE_LOCK_DIR", Path(tempfile.gettempdir()) / "kdpipe-locks"))
    lock_dir.mkdir(parents=True, exist_ok=True)
    uri = mlflow.get_tracking_uri()
    name = hashlib.sha256(f"{uri}|{key}".encode()).hexdigest()[:24]
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

"""The tracking store as kdpipe uses it.

Names users see (stable, dashboards depend on them): tag `kdpipe.stage` on every stage run,
`kdpipe.cache_key` on every stage run, `kdpipe.reused_from` where a stage was reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param, Run
from mlflow.tracking import MlflowClient

from kdpipe import cache_dir
from kdpipe.locks import exclusive
from kdpipe.preflight import sqlite_path

STAGE_TAG = "kdpipe.stage"
CACHE_KEY_TAG = "kdpipe.cache_key"
REUSED_FROM_TAG = "kdpipe.reused_from"
ARTIFACT_TAG = "kdpipe.artifact"  # set last, only once a stage's model artefact is stored
RUN_TYPE_TAG = "kdpipe.run_type"  # "pipeline" on the parent run, "stage" on its children
ARTIFACT_SHA256_TAG = "kdpipe.artifact_sha256"  # of the model file, checked before it is reused

log = logging.getLogger("kdpipe")


def setup_tracking(uri: str | None, experiment: str, artifact_location: str | None = None) -> str:
    """Point MLflow at `uri` (MLflow's own default when None) and select `experiment`,
    creating it (with `artifact_location` if given) when missing. Returns the experiment id."""
    if uri:
        mlflow.set_tracking_uri(uri)
    # A new SQLite store is created by migrating an empty file: two jobs starting at once on one
    # store must not both migrate it (the second fails), so the first access is serialised.
    with stage_lock("store-init"):
        seed_sqlite_store(mlflow.get_tracking_uri())
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


def seed_sqlite_store(uri: str) -> bool:
    """Give a SQLite store that does not exist yet MLflow's empty, fully migrated schema.

    MLflow creates a new SQLite store by running its ~70 schema migrations (about 2 s on 2 CPU
    cores, every new store: each test, each fresh working directory). The result depends only
    on the MLflow, SQLAlchemy and SQLite versions, so it is built once (by MLflow's own
    migration code, into an empty file), kept under `$KDPIPE_CACHE_DIR/mlflow-schema/` (default
    `~/.cache/kdpipe`), and copied to the new store's path. MLflow then opens a store at its head
    revision and adds the Default experiment itself, exactly as after migrating. Returns whether
    it seeded; on any problem (unwritable cache, changed MLflow internals) MLflow creates the
    store as usual."""
    path = sqlite_path(uri)
    if path is None or (path.exists() and path.stat().st_size > 0):
        return False
    try:
        template = _schema_template()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        os.replace(tmp, path)
    except Exception as exc:  # the usual creation path still works
        log.debug("no schema template for %s (%s); MLflow migrates the new store", uri, exc)
        return False
    return True


def _schema_template() -> Path:
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    versions = f"mlflow{mlflow.__version__}-sqlalchemy{sqlalchemy.__version__}-sqlite{sqlite3.sqlite_version}"
    root = cache_dir("mlflow-schema")
    template = root / f"{versions}.db"
    if template.is_file():
        return template
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{versions}.{os.getpid()}.db"
    tmp.unlink(missing_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(tmp, template)  # atomic: a parallel job sees no template or a whole one
    return template


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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_verified_artifact(run: Run, dst: Path) -> Path:
    """Download the model artefact of a finished stage run into `dst` and check it is the file
    that was logged (its SHA-256, recorded at logging): a truncated or replaced artefact raises
    `ValueError`, and the caller computes the stage again."""
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                     artifact_path=run.data.tags[ARTIFACT_TAG],
                                                     dst_path=str(dst)))
    expected = run.data.tags.get(ARTIFACT_SHA256_TAG)
    if expected is None:
        raise ValueError(f"run {run.info.run_id} records no {ARTIFACT_SHA256_TAG} to check its artefact by")
    if local.is_file() and file_sha256(local) != expected:
        raise ValueError(f"{run.data.tags[ARTIFACT_TAG]} of run {run.info.run_id} is damaged: its SHA-256 "
                         f"differs from the one recorded when it was logged")
    return local


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
    """An exclusive, machine-wide lock per cache key and store (`kdpipe.locks.exclusive`), so two
    jobs of a parallel sweep never compute the same stage twice: the second waits, then finds the
    first one's finished run and reuses it. The OS drops the lock if a job dies."""
    with exclusive(f"{mlflow.get_tracking_uri()}|{key}"):
        yield

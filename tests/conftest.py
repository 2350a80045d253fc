"""Shared fixtures: a real MLflow SQLite store in a temp dir, and fast pipeline settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The suite runs in two pytest-xdist workers (pyproject.toml): one thread each for torch and for
# the `kdpipe` processes the tests start, so the two workers share the two cores instead of fighting
# over them. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from kdpipe.cli import CONFIG_PATH

REPO = Path(__file__).resolve().parent.parent

# Tiny but real: synthetic data, one epoch, narrow models, short latency loops.
FAST = [
    "data=synthetic",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "teacher.model.width=8",
    "student.model.width=4",
    "eval.latency_iters=10",
    "eval.latency_warmup=2",
]


def use_store(monkeypatch: pytest.MonkeyPatch, root: Path) -> str:
    """Point MLflow (and the stage locks) at a SQLite store in `root` and work from there."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KDPIPE_LOCK_DIR", str(root / "locks"))
    # MLflow remembers the active experiment across stores, in a module global and in
    # MLFLOW_EXPERIMENT_ID (set in-process by set_experiment): an earlier test's would not exist in
    # this store. Start without either, as a fresh process does (no public API resets the global).
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(autouse=True)
def _tracking_uri_stays_with_its_test():
    """`mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ (MLflow 3): without
    this, one test's store or server (gone by then) would be the next test's in this worker, and that
    of every kdpipe process it starts."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh tracking store; the test runs inside its directory."""
    uri = use_store(monkeypatch, tmp_path)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def make_cfg(overrides: list[str], fast: bool = True):
    """The composed config of `kdpipe <overrides>`, after FAST unless `fast` is false."""
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("config", overrides=[*(FAST if fast else []), *overrides])


def run_job(overrides: list[str], workdir: Path, fast: bool = True) -> dict[str, float]:
    """Compose (after FAST unless `fast` is false), validate and run a pipeline in this process, as
    `kdpipe` does after Hydra: for tests of what the stages do, without a process's 10 s of imports.
    Tests of the command itself (exit codes, one-line errors, signals, Hydra's folders) use `run_cli`."""
    from kdpipe.config import validate
    from kdpipe.pipeline import run_pipeline

    cfg = make_cfg(overrides, fast)
    validate(cfg)
    return run_pipeline(cfg, workdir)


def run_cli(args: list[str], cwd: Path, env_extra: dict | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `kdpipe` command (`python -m kdpipe`) in a subprocess."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kdpipe", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stage_runs(experiment: str = "kdpipe") -> dict:
    """All runs of the experiment, as a list of mlflow Run objects."""
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")

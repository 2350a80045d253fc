"""The kill matrix: the real `kdpipe` command killed (SIGKILL, SIGTERM) at the start of every
stage and during the final model logging, then the same command again. Each rerun must find
what the killed job left, and the last one must finish with every stage computed exactly once
and no run left RUNNING. The kill lands where it is meant to through `KDPIPE_FAULT_INJECT`:
the process sends itself the real signal at that point (kdpipe/faults.py `fault_point`)."""

from __future__ import annotations

import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import FAST, run_cli

POINTS = ["stage-teacher", "stage-distill", "stage-prune", "stage-quantize", "stage-evaluate", "log-model"]
ARGS = [*FAST, "export.onnx=false"]  # all five stages: teacher, distill, prune, static int8, evaluate
TRAINED = ["teacher", "distill", "prune", "quantize"]  # evaluate measures afresh on every run


def _chain(root: Path, sig: str) -> list[tuple[str, int, str]]:
    """Kill the same command at each point in turn, then let it finish; (point, exit code, stderr)."""
    root.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "KDPIPE_LOCK_DIR": str(root / "locks")}
    results = []
    for point in [*POINTS, None]:
        res = run_cli(ARGS, root, {**env, "KDPIPE_FAULT_INJECT": f"{point}:{sig}" if point else ""})
        results.append((point or "none", res.returncode, res.stderr))
    return results


def _runs(db: Path) -> list[tuple[str, str, str, str | None]]:
    """(status, run type, stage, reused_from) of every run in the store, read with sqlite3."""
    with sqlite3.connect(db) as con:
        rows = con.execute("""
            SELECT r.status, t1.value, t2.value, t3.value FROM runs r
            LEFT JOIN tags t1 ON t1.run_uuid = r.run_uuid AND t1.key = 'kdpipe.run_type'
            LEFT JOIN tags t2 ON t2.run_uuid = r.run_uuid AND t2.key = 'kdpipe.stage'
            LEFT JOIN tags t3 ON t3.run_uuid = r.run_uuid AND t3.key = 'kdpipe.reused_from'
        """).fetchall()
    return rows


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Both chains at once (one per signal, each on its own store): they share no state."""
    root = tmp_path_factory.mktemp("kill")
    with ThreadPoolExecutor(2) as pool:
        futures = {sig: pool.submit(_chain, root / sig, sig) for sig in ("SIGKILL", "SIGTERM")}
        return {sig: (root / sig, f.result()) for sig, f in futures.items()}


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_at_every_stage_then_run_again_finishes_with_nothing_recomputed_or_left_running(chains, sig):
    root, results = chains[sig]
    expected = -signal.SIGKILL if sig == "SIGKILL" else 128 + signal.SIGTERM
    for point, code, stderr in results[:-1]:
        assert code == expected, f"killed at {point}: exit {code}\n{stderr[-2000:]}"
        if sig == "SIGTERM":  # one line says what happened and what to do; no traceback
            assert "kdpipe: received SIGTERM: runs " in stderr and "Traceback" not in stderr, stderr[-2000:]
    point, code, stderr = results[-1]
    assert code == 0, stderr[-3000:]

    runs = _runs(root / "mlflow.db")
    assert [r for r in runs if r[0] == "RUNNING"] == []
    assert {r[0] for r in runs} <= {"FINISHED", "KILLED"}
    pipelines = [r for r in runs if r[1] == "pipeline"]
    assert sorted(r[0] for r in pipelines) == ["FINISHED"] + ["KILLED"] * len(POINTS)
    for stage in TRAINED:  # each finished stage was computed once and reused by every later job
        computed = [r for r in runs if r[2] == stage and r[0] == "FINISHED" and r[3] is None]
        assert len(computed) == 1, (stage, computed)
    # the job killed during the final logging had every stage finished: its rerun reused them all
    last_reuses = [r for r in runs if r[2] in TRAINED and r[0] == "FINISHED" and r[3] is not None]
    assert len(last_reuses) >= len(TRAINED)

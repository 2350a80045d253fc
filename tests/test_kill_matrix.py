"""The kill matrix: the real `kdpipe` command killed (SIGKILL) at the start of every stage and
during the final model logging, or (SIGTERM) at three of those points, then the same command again.
Each rerun must find what the killed job left, and the last one must finish with every stage
computed exactly once and no run left RUNNING. The kill lands where it is meant to through
`KDPIPE_FAULT_INJECT`: the process sends itself the real signal at that point (kdpipe/faults.py
`fault_point`). The chains are those of scripts/bench_faults.py, which kills at every point for both
signals and reports the numbers as a table."""

from __future__ import annotations

import signal

import pytest

from scripts.bench_faults import POINTS, computed_stages, run_both, store_runs

# The module-scoped fixtures are built once: all of this module's tests run in one worker. The
# fixture runs both kill chains, a kdpipe process per kill point and the reruns (266 s alone on two
# busy cores): the hang guard is 15 minutes.
pytestmark = [pytest.mark.xdist_group("kill_matrix"), pytest.mark.timeout(900)]

# SIGKILL at every point: nothing runs after it, so each point is its own case of what a rerun must
# find. SIGTERM goes through one handler wherever it lands; here before any stage, between stages and
# during the final logging (scripts/bench_faults.py kills at every point for both signals).
KILLED_AT = {"SIGKILL": POINTS, "SIGTERM": ["stage-teacher", "stage-prune", "log-model"]}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """Both chains at once (one per signal, each on its own store): they share nothing."""
    return run_both(tmp_path_factory.mktemp("kill"), KILLED_AT)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_at_every_stage_then_run_again_finishes_with_nothing_recomputed_or_left_running(chains, sig):
    root, results = chains[sig]
    expected = -signal.SIGKILL if sig == "SIGKILL" else 128 + signal.SIGTERM
    for point, code, stderr, _ in results[:-1]:
        assert code == expected, f"killed at {point}: exit {code}\n{stderr[-2000:]}"
        if sig == "SIGTERM":  # one line says what happened and what to do; no traceback
            assert "kdpipe: received SIGTERM: runs " in stderr and "Traceback" not in stderr, stderr[-2000:]
    point, code, stderr, _ = results[-1]
    assert code == 0, stderr[-3000:]

    runs = store_runs(root / "mlflow.db")
    assert [r for r in runs if r[0] == "RUNNING"] == []
    assert {r[0] for r in runs} <= {"FINISHED", "KILLED"}
    pipelines = sorted(r[0] for r in runs if r[1] == "pipeline")
    assert pipelines == ["FINISHED"] + ["KILLED"] * len(KILLED_AT[sig])
    # each stage was computed once, by the first job that got past its start, and reused after
    assert computed_stages(runs) == {"teacher": 1, "distill": 1, "prune": 1, "quantize": 1}
    # the last job (after a kill during the final logging) reused every trained stage
    assert sum(1 for r in runs if r[0] == "FINISHED" and r[3] is not None) >= 4

"""Scale-out on real engines: a real `mlflow server` over HTTP, two sweeps on one store at once,
Lightning DDP with two CPU processes (gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdpipe.config import validate
from kdpipe.pipeline import run_pipeline
from tests.conftest import FAST, make_cfg

# The module-scoped fixtures are built once: all of this module's tests run in one worker.
pytestmark = pytest.mark.xdist_group("scale")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server on loopback: SQLite backend, artefacts served by the server."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--workers", "1"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
    yield url, root
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: uvicorn and its workers
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:  # a throwaway server need not shut down gracefully
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    log.close()


def test_a_pipeline_against_a_tracking_server_stores_runs_and_artefacts_on_the_server(
        mlflow_server, tmp_path, monkeypatch):
    url, root = mlflow_server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDPIPE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"tracking.uri={url}", "tracking.experiment=server-test", "prune=none", "quantize=none"]
    cfg = make_cfg(overrides)
    validate(cfg)
    run_pipeline(cfg, tmp_path / "out")
    run_pipeline(make_cfg(overrides), tmp_path / "out2")  # the same again: stages reused over HTTP

    # read everything back over the REST API, as a dashboard would
    exp = _get(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=server-test")["experiment"]
    assert exp["artifact_location"].startswith("mlflow-artifacts:")
    runs = _get(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                        "max_results": 100})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags, strict=True) if t.get("kdpipe.run_type") == "pipeline"]
    assert len(parents) == 2 and all(p["info"]["status"] == "FINISHED" for p in parents)
    stages = [t for t in tags if t.get("kdpipe.run_type") == "stage"]
    assert sorted(t["kdpipe.stage"] for t in stages if "kdpipe.reused_from" in t) == ["distill", "teacher"]
    # the artefacts live in the server's store, not next to the client
    assert list((root / "artifacts").rglob("model.pt")) and not (tmp_path / "mlruns").exists()
    mlflow.set_tracking_uri(url)
    final = mlflow.pytorch.load_model(f"runs:/{parents[0]['info']['run_id']}/model")
    assert final(torch.zeros(1, 1, 8, 8)).shape == (1, 4)


def test_two_sweeps_at_once_on_one_local_store_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "KDPIPE_LOCK_DIR": str(tmp_path / "locks")}
    args = [sys.executable, "-m", "kdpipe", "-m", *FAST, "prune=none", "quantize=none",
            "distill.temperature=2,4"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline"]
    assert len(parents) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("kdpipe.stage"), []).append(r)
    # one teacher and one student per temperature were trained; every other job reused them
    trained = [r for r in by_stage["teacher"] + by_stage["distill"]
               if "kdpipe.reused_from" not in r.data.tags]
    assert sorted(r.data.tags["kdpipe.stage"] for r in trained) == ["distill", "distill", "teacher"]
    client = MlflowClient()
    for r in runs:  # every stage that computed a model kept it; every reused one points at a kept one
        source = client.get_run(r.data.tags.get("kdpipe.reused_from", r.info.run_id))
        if "kdpipe.artifact" in source.data.tags:
            local = mlflow.artifacts.download_artifacts(run_id=source.info.run_id,
                                                        artifact_path=source.data.tags["kdpipe.artifact"],
                                                        dst_path=str(tmp_path / "dl" / r.info.run_id))
            assert Path(local).stat().st_size > 0
    for p in parents:
        model = mlflow.pytorch.load_model(f"runs:/{p.info.run_id}/model")
        assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 4)
    # each job wrote its files to its own output folder
    jobs = [d for d in Path(tmp_path, "outputs", "multirun").glob("*/*/*") if d.is_dir() and d.name.isdigit()]
    assert len(jobs) == 4


def test_ddp_with_two_cpu_processes_logs_once_reuses_stages_and_loads(store, tmp_path):
    overrides = ["trainer=ddp", "trainer.max_epochs=2", "prune=none", "quantize=none"]
    cfg = make_cfg(overrides)
    validate(cfg)
    run_pipeline(cfg, tmp_path / "out")
    run_pipeline(make_cfg(overrides), tmp_path / "out2")
    runs = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")
    # one parent and one run per stage for each pipeline: no rank created runs of its own
    assert sorted(r.data.tags.get("kdpipe.stage", "pipeline") for r in runs) == \
        sorted(["pipeline", "teacher", "distill", "evaluate"] * 2)
    assert all(r.info.status == "FINISHED" for r in runs)
    first = min((r for r in runs if r.data.tags.get("kdpipe.stage") == "distill"),
                key=lambda r: r.info.start_time)
    second = max((r for r in runs if r.data.tags.get("kdpipe.stage") == "teacher"),
                 key=lambda r: r.info.start_time)
    assert "kdpipe.reused_from" in second.data.tags  # the teacher cache works under DDP
    history = MlflowClient().get_metric_history(first.info.run_id, "val/acc")
    assert len(history) == 2  # logged once per epoch, by rank 0 only
    # two ranks split each epoch: 333 training samples, batch 64 -> ceil(167 / 64) = 3 steps per rank
    n_train = 512 - round(512 * 0.2) - round(512 * 0.15)
    steps_per_epoch = math.ceil(math.ceil(n_train / 2) / 64)
    assert max(m.step for m in history) + 1 == 2 * steps_per_epoch  # one process alone: 2 * 6 steps
    parent = mlflow.get_run(first.data.tags["mlflow.parentRunId"])
    model = mlflow.pytorch.load_model(f"runs:/{parent.info.run_id}/model")
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 4)

"""Faults: a job killed mid-stage (SIGKILL, SIGTERM) and started again, a diverging loss,
inputs that could do harm. Real subprocesses, real signals, a real MLflow store."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from kdpipe.models.io import load_model, load_state_dict_any
from kdpipe.pipeline import run_pipeline
from tests.conftest import FAST, make_cfg

# One teacher epoch, six distill epochs of 16 batches: slow enough for a kill to land mid-stage.
RESUME_ARGS = [*FAST, "data.num_samples=2048", "data.batch_size=128", "teacher.max_epochs=1",
               "distill.max_epochs=6", "prune=none", "quantize=none"]


def _stage_runs(stage: str) -> list:
    return mlflow.search_runs(experiment_names=["kdpipe"], output_format="list",
                              filter_string=f"tags.`kdpipe.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def _start(cwd: Path, args: list[str] = RESUME_ARGS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdpipe", *args], cwd=cwd, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}:\n"
                        f"{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _running_distill_checkpoint(ckpt_root: Path, not_run: str | None = None, newer_than: float = 0.0,
                                fit: str = "student"):
    """(run, last.ckpt) of the distill stage running now, once its fit `fit` has saved an epoch."""
    for run in _stage_runs("distill"):
        if run.info.status != "RUNNING" or run.info.run_id == not_run:
            continue
        last = ckpt_root / run.data.tags["kdpipe.cache_key"] / fit / "last.ckpt"
        if last.is_file() and last.stat().st_mtime > newer_than:
            return run, last
    return None


def test_a_killed_job_run_again_reuses_finished_stages_and_resumes_the_interrupted_one(store, tmp_path):
    ckpt_root = tmp_path / ".kdpipe" / "checkpoints"

    # 1. SIGKILL in the middle of the distill stage: nothing in the process gets to run.
    first = _start(tmp_path)
    run_a, _ = _wait_for(lambda: _running_distill_checkpoint(ckpt_root), first, "a distill checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    teacher_a = _stage_runs("teacher")[0]
    assert teacher_a.info.status == "FINISHED"
    assert mlflow.get_run(run_a.info.run_id).info.status == "RUNNING"  # nobody could mark it

    # 2. The same command again, stopped by SIGTERM once it has resumed and saved an epoch.
    second = _start(tmp_path)
    since = (ckpt_root / run_a.data.tags["kdpipe.cache_key"] / "student" / "last.ckpt").stat().st_mtime
    run_b, _ = _wait_for(lambda: _running_distill_checkpoint(ckpt_root, run_a.info.run_id, since), second,
                         "the resumed distill stage to save an epoch")
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 143, err[-3000:]
    assert "marked KILLED" in err and "run the same command again" in err
    client = MlflowClient()
    run_b = client.get_run(run_b.info.run_id)
    assert run_b.info.status == "KILLED"
    assert client.get_run(run_b.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    # the SIGKILLed job's runs were found by the second job and ended KILLED, not left RUNNING
    assert client.get_run(run_a.info.run_id).info.status == "KILLED"
    assert client.get_run(run_a.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    assert run_b.data.tags["kdpipe.resumed_from"] == run_a.info.run_id
    epoch_b = int(run_b.data.tags["kdpipe.resumed_epoch"])
    assert epoch_b >= 1

    # 3. Once more, to the end (in this process: same store, same folder, same command line)
    run_pipeline(make_cfg(RESUME_ARGS[len(FAST):]), tmp_path / "out")
    teacher_c, distill_c = _stage_runs("teacher")[0], _stage_runs("distill")[0]
    assert teacher_c.data.tags["kdpipe.reused_from"] == teacher_a.info.run_id
    assert distill_c.info.status == "FINISHED"
    assert distill_c.data.tags["kdpipe.resumed_from"] == run_b.info.run_id
    assert int(distill_c.data.tags["kdpipe.resumed_epoch"]) > epoch_b
    # the resumed stage trained only the remaining epochs, and its curve ends at the last one
    history = client.get_metric_history(distill_c.info.run_id, "val/acc")
    assert 0 < len(history) <= 6 - epoch_b
    # no artefact of a finished stage was lost; the result loads; nothing is left RUNNING
    local = mlflow.artifacts.download_artifacts(f"runs:/{teacher_a.info.run_id}/model/model.pt",
                                                dst_path=str(tmp_path / "dl"))
    assert isinstance(load_model(local), torch.nn.Module)
    model = mlflow.pytorch.load_model(f"runs:/{distill_c.data.tags['mlflow.parentRunId']}/model")
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 4)
    statuses = {r.info.status for r in mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")}
    assert "RUNNING" not in statuses
    assert not any(ckpt_root.iterdir())  # a finished stage needs no checkpoint


MULTI_FIT = [*FAST, "data.num_samples=2048", "data.batch_size=64", "teacher.max_epochs=1",
             "distill.max_epochs=3", "prune=none", "quantize=none"]


@pytest.mark.parametrize("args, fit, done", [
    (["distill=born_again", "distill.scheme.generations=2"], "gen2", ["gen0", "gen1"]),
    (["distill=kd", "distill.scheme.chain=[{_target_:kdpipe.models.cnn,width:6,depth:2},"
      "{_target_:kdpipe.models.cnn,width:5,depth:2}]"], "ta1", ["ta0"]),
], ids=["born_again_generation_2", "chain_link_2"])
def test_a_fit_after_the_first_resumes_where_it_was_killed(store, tmp_path, args, fit, done):
    """A stage that fits several models in turn: after a SIGKILL in a later fit, the same command
    restores the finished fits without training them again and goes on in the interrupted one."""
    ckpt_root = tmp_path / ".kdpipe" / "checkpoints"
    job = _start(tmp_path, [*MULTI_FIT, *args])
    _wait_for(lambda: list(ckpt_root.glob(f"*/{fit}/last.ckpt")), job, f"a checkpoint of {fit}")
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    run_a = _stage_runs("distill")[0]
    assert run_a.info.status == "RUNNING"  # the end of a fit does not end the stage's run
    key = run_a.data.tags["kdpipe.cache_key"]
    assert all((ckpt_root / key / name / "last.ckpt").is_file() for name in done)

    run_pipeline(make_cfg([*MULTI_FIT[len(FAST):], *args]), tmp_path / "out")
    client = MlflowClient()
    run_b = _stage_runs("distill")[0]
    assert run_b.info.status == "FINISHED" and run_b.data.tags["kdpipe.cache_key"] == key
    assert client.get_run(run_a.info.run_id).info.status == "KILLED"
    assert run_b.data.tags["kdpipe.resumed_fit"] == f"distill/{fit}"
    assert run_b.data.tags["kdpipe.resumed_from"] == run_a.info.run_id
    resumed_epoch = int(run_b.data.tags["kdpipe.resumed_epoch"])
    assert 1 <= resumed_epoch < 3
    # the finished fits trained no further; the interrupted one trained only its remaining epochs,
    # and the fits after it (the student of a chain) all of theirs
    after = 0 if fit == "gen2" else 3
    assert len(client.get_metric_history(run_b.info.run_id, "val/acc")) == 3 - resumed_epoch + after
    assert not any(ckpt_root.iterdir())


def test_a_diverging_loss_stops_the_stage_naming_term_and_epoch_and_marks_it_failed(store, tmp_path):
    cfg = make_cfg(["optim.lr=1e30", "teacher.max_epochs=2", "prune=none", "quantize=none"])
    with pytest.raises(FloatingPointError,
                       match=r"stage teacher, fit teacher: loss term\(s\) ce became (nan|inf) at epoch \d"):
        run_pipeline(cfg, tmp_path / "out")
    while mlflow.active_run():
        mlflow.end_run()
    teacher = _stage_runs("teacher")[0]
    assert teacher.info.status == "FAILED"
    parent = mlflow.get_run(teacher.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"


def test_a_teacher_checkpoint_that_would_run_code_is_refused_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "teacher.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_any(path)  # what the teacher stage loads `teacher.checkpoint` with
    assert not (tmp_path / "pwned").exists()


def test_a_data_path_from_the_config_never_reaches_a_shell(store, tmp_path):
    from hydra.utils import instantiate

    from kdpipe.errors import ConfigError

    evil = f"/nonexistent; touch {tmp_path / 'pwned'}; $(touch {tmp_path / 'pwned2'})"
    cfg = make_cfg(["data=cifar10", f"data.root='{evil}'"])
    with pytest.raises(ConfigError, match="lacks the cifar10 batch files"):
        instantiate(cfg.data).setup()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()

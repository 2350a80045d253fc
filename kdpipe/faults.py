"""Surviving faults: resume a killed training stage, and never leave a run marked RUNNING.

A job can die three ways: an error (the MLflow contexts mark its runs FAILED), SIGTERM (a
scheduler's polite kill: `on_sigterm` turns it into an exception so the same contexts run,
and the CLI then marks the runs KILLED), and SIGKILL (nothing runs: the next job with the same
stage finds the dead owner's RUNNING run through its `kdpipe.host`/`kdpipe.pid` tags and marks
it KILLED). Training checkpoints live under `checkpoint_dir/<stage cache key>/`, so the same
command run again finds the interrupted stage's last epoch and resumes there, the way
Lightning's `fit(ckpt_path=...)` restores model, optimiser, scheduler and loop state.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

log = logging.getLogger("kdpipe")

HOST_TAG = "kdpipe.host"
PID_TAG = "kdpipe.pid"
RESUMED_FROM_TAG = "kdpipe.resumed_from"  # the interrupted run whose checkpoint a stage resumed
RESUMED_EPOCH_TAG = "kdpipe.resumed_epoch"
RESUMED_FIT_TAG = "kdpipe.resumed_fit"  # which fit of the stage (student, gen2, ta1...) was interrupted


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM outside a Lightning fit. A BaseException, like
    KeyboardInterrupt, so that libraries which wrap every `Exception` (MLflow's store does)
    let it through."""


# What the SIGTERM handler saw: the signal, the MLflow runs active then, and whether a
# Lightning fit was running (which then stops itself after the current batch).
_state: dict = {"signum": None, "run_ids": [], "fitting": 0}


@contextmanager
def fitting() -> Iterator[None]:
    """Mark a Lightning fit: on SIGTERM Lightning's own handler (which chains to ours) raises
    `SIGTERMException` after the current batch, so ours must not interrupt it mid-step."""
    _state["fitting"] += 1
    try:
        yield
    finally:
        _state["fitting"] -= 1


def terminated_runs() -> list[str]:
    """The runs active when SIGTERM arrived (empty if it did not)."""
    return list(_state["run_ids"]) if _state["signum"] else []


def owner_tags() -> dict[str, str]:
    """Who runs a run: lets a later job tell a live run from one whose process was SIGKILLed."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _owner_is_dead(run: Run) -> bool:
    tags = run.data.tags
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False  # another machine's run: we cannot tell, leave it
    pid = int(tags[PID_TAG])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def interrupted_runs(cache_key: str, key_tag: str = "kdpipe.cache_key") -> list[Run]:
    """The runs of this stage that did not finish, newest first. RUNNING ones whose process on
    this host is gone (SIGKILL, power loss) are ended as KILLED here, with their RUNNING
    pipeline runs."""
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{key_tag}` = '{cache_key}'",
                              order_by=["attributes.start_time DESC"])
    dead = [r for r in runs if r.info.status == "RUNNING" and _owner_is_dead(r)]
    for run in dead:
        client.set_terminated(run.info.run_id, "KILLED")
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id:
            parent = client.get_run(parent_id)
            if parent.info.status == "RUNNING" and _owner_is_dead(parent):
                client.set_terminated(parent_id, "KILLED")
        log.warning("run %s of a killed job (pid %s) was left RUNNING: marked KILLED",
                    run.info.run_id, run.data.tags.get(PID_TAG))
    dead_ids = {r.info.run_id for r in dead}
    return [r for r in runs if r.info.run_id in dead_ids or r.info.status in ("KILLED", "FAILED")]


def checkpoint_dir(root: str | os.PathLike, key: str) -> Path:
    return Path(os.path.expanduser(str(root))) / key


def resume_checkpoint(root: str | os.PathLike, key: str) -> Path | None:
    """The last checkpoint an interrupted run of this stage left, if it is a whole file (a
    SIGKILL during `torch.save` leaves a truncated zip, which is ignored)."""
    last = checkpoint_dir(root, key) / "last.ckpt"
    if last.is_file() and zipfile.is_zipfile(last):
        return last
    return None


def resume_from(root: str | os.PathLike, key: str, fit: str, max_epochs: int,
                interrupted: list[Run]) -> Path | None:
    """The checkpoint a fit should resume from (None to start afresh). A fit that had finished
    before the kill is restored and trains no further; the one the kill interrupted tags the
    stage run with where it went on (`kdpipe.resumed_fit`, `kdpipe.resumed_epoch`,
    `kdpipe.resumed_from`)."""
    ckpt = resume_checkpoint(root, key)
    if ckpt is None:
        return None
    import torch

    epoch = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("epoch", -1) + 1
    if epoch >= max_epochs:
        log.info("%s: finished before the interruption, restored from %s", fit, ckpt)
        return ckpt
    tags = {RESUMED_EPOCH_TAG: str(epoch), RESUMED_FIT_TAG: fit}
    if interrupted:
        tags[RESUMED_FROM_TAG] = interrupted[0].info.run_id
    mlflow.set_tags(tags)
    log.warning("%s: resuming from %s (epoch %d)", fit, ckpt, epoch)
    return ckpt


def clear_checkpoints(root: str | os.PathLike, key: str) -> None:
    """A stage whose artefact is stored needs no checkpoint to resume from."""
    shutil.rmtree(checkpoint_dir(root, key), ignore_errors=True)


@contextmanager
def on_sigterm() -> Iterator[None]:
    """Install the SIGTERM handler: it records the active MLflow runs (so the caller can mark
    them KILLED once their contexts have unwound) and raises `Terminated`, unless a Lightning
    fit is running, which stops at the end of the batch with `SIGTERMException`."""

    def handler(signum, frame):
        active = mlflow.active_run()
        ids = [] if active is None else [active.info.run_id, active.data.tags.get("mlflow.parentRunId")]
        _state["signum"], _state["run_ids"] = signum, [i for i in ids if i]
        if not _state["fitting"]:
            raise Terminated(f"received {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():  # e.g. a launcher's worker thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def mark_killed(run_ids: list[str]) -> None:
    client = MlflowClient()
    for run_id in run_ids:
        try:
            client.set_terminated(run_id, "KILLED")
        except Exception as exc:  # the store itself may be what failed
            log.warning("could not mark run %s KILLED: %s", run_id, exc)

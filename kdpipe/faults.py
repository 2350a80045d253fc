"""Surviving faults: resume a killed training stage, and never leave a run marked RUNNING.

A job can die three ways: an error (the MLflow contexts mark its runs FAILED), SIGTERM (a
scheduler's polite kill: the handler only sets a flag, which the job checks between steps and
stages, raising `Terminated` there so the same contexts run; the CLI then marks the runs KILLED
and exits 143), and SIGKILL (nothing runs: the next job on the same store finds every RUNNING run
whose owner process is gone, through its `kdpipe.owner` tag, and marks it KILLED; `kdpipe-doctor`
does the same on demand, and for runs of other hosts). Training checkpoints live under
`checkpoint_dir/<stage cache key>/`, so the same command run again finds the interrupted stage's
last epoch and resumes there, the way Lightning's `fit(ckpt_path=...)` restores model, optimiser,
scheduler and loop state.
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
OWNER_TAG = "kdpipe.owner"  # <boot id>:<pid>:<process start time>: unique per process, even as PID 1
RESUMED_FROM_TAG = "kdpipe.resumed_from"  # the interrupted run whose checkpoint a stage resumed
RESUMED_EPOCH_TAG = "kdpipe.resumed_epoch"
RESUMED_FIT_TAG = "kdpipe.resumed_fit"  # which fit of the stage (student, gen2, ta1...) was interrupted


class Terminated(BaseException):
    """Raised in the main thread, at the next check after SIGTERM arrived. A BaseException, like
    KeyboardInterrupt, so that libraries which wrap every `Exception` (MLflow's store does)
    let it through."""


# What the SIGTERM handler saw: the signal and the MLflow runs active then.
_state: dict = {"signum": None, "run_ids": []}


def terminated_runs() -> list[str]:
    """The runs active when SIGTERM arrived (empty if it did not)."""
    return list(_state["run_ids"]) if _state["signum"] else []


def stop_if_terminated() -> None:
    """Raise `Terminated` if SIGTERM has arrived. Called between steps and stages: raising in the
    signal handler itself is not safe, as the handler may run inside a `__del__` or a garbage
    collector callback, where Python swallows the exception and the job runs on."""
    if _state["signum"]:
        raise Terminated(f"received {signal.Signals(_state['signum']).name}")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None if there is no
    such process. With the boot id this tells a process from a later one given the same pid, as
    in a container where every job is PID 1."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def owner_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}:{pid}:{process_start(pid) or ''}"


def owner_tags() -> dict[str, str]:
    """Who runs a run: lets a later job tell a live run from one whose process was SIGKILLed."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), OWNER_TAG: owner_id()}


def owner_state(run: Run) -> str:
    """`alive`, `dead`, or `unknown` (a run of another host, or without owner tags)."""
    tags = run.data.tags
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return "unknown"
    pid = int(tags[PID_TAG])
    boot, _, start = tags.get(OWNER_TAG, "").rpartition(":")
    boot = boot.rpartition(":")[0]
    if boot and start and _boot_id():  # Linux: the recorded process, not just its pid
        if boot != _boot_id():
            return "dead"  # the machine has rebooted since
        return "alive" if process_start(pid) == start else "dead"
    if pid == os.getpid():
        return "alive"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:  # alive, someone else's
        return "alive"
    return "alive"


def orphan_runs(all_hosts: bool = False) -> list[tuple[Run, str]]:
    """RUNNING runs of kdpipe in the store (every experiment), each with `owner_state`: those of
    this host only, unless `all_hosts`."""
    where = "attributes.status = 'RUNNING'"
    if not all_hosts:
        where += f" and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=where,
                              order_by=["attributes.start_time DESC"])
    return [(r, owner_state(r)) for r in runs if HOST_TAG in r.data.tags]


def reap_orphans() -> list[str]:
    """Mark KILLED every RUNNING run of this host whose owner process is gone (a job SIGKILLed,
    OOM-killed or lost with its machine), in any stage or after the last one; return their ids.
    Every job does this as it starts, so a killed job never leaves a run RUNNING for long."""
    client = MlflowClient()
    reaped = []
    for run, state in orphan_runs():
        if state != "dead":
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
        log.warning("run %s (%s) of a killed job (pid %s) was left RUNNING: marked KILLED",
                    run.info.run_id, run.info.run_name, run.data.tags.get(PID_TAG))
    return reaped


def interrupted_runs(cache_key: str, key_tag: str = "kdpipe.cache_key") -> list[Run]:
    """The runs of this stage that did not finish, newest first: KILLED or FAILED ones (a dead
    owner's RUNNING run was marked KILLED by `reap_orphans` when this job started)."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{key_tag}` = '{cache_key}'",
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if r.info.status in ("KILLED", "FAILED")]


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
    """Install the SIGTERM handler: it records the signal and the active MLflow runs, nothing
    more; `stop_if_terminated` (between steps and stages) and Lightning's own check (after each
    training batch: its handler chains to ours) end the job, and the caller marks the runs KILLED
    once their contexts have unwound."""

    def handler(signum, frame):
        active = mlflow.active_run()
        ids = [] if active is None else [active.info.run_id, active.data.tags.get("mlflow.parentRunId")]
        _state["signum"], _state["run_ids"] = signum, [i for i in ids if i]

    if threading.current_thread() is not threading.main_thread():  # e.g. a launcher's worker thread
        yield
        return
    _state["signum"], _state["run_ids"] = None, []
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fault_point(name: str) -> None:
    """A place where the fault tests kill the job: with `KDPIPE_FAULT_INJECT=<name>:<SIGNAL>`
    (e.g. `stage-distill:SIGKILL`, `log-model:SIGTERM`) the process sends itself that signal
    here. Unset (always, outside the tests), it only checks for a SIGTERM that has arrived."""
    point, _, sig = os.environ.get("KDPIPE_FAULT_INJECT", "").partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
    stop_if_terminated()


def mark_killed(run_ids: list[str]) -> None:
    client = MlflowClient()
    for run_id in run_ids:
        try:
            client.set_terminated(run_id, "KILLED")
        except Exception as exc:  # the store itself may be what failed
            log.warning("could not mark run %s KILLED: %s", run_id, exc)

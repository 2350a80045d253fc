"""No stale reuse, no orphan runs, safe lock files, SIGTERM by flag: the silent failures of
issue 16, each reproduced against the real store, the real pipeline and real processes."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

import kdpipe
from kdpipe.data import SyntheticDataModule
from kdpipe.faults import (
    HOST_TAG,
    OWNER_TAG,
    PID_TAG,
    Terminated,
    on_sigterm,
    owner_tags,
    reap_orphans,
    stop_if_terminated,
)
from kdpipe.locks import LockError, exclusive, lock_dir, lock_path
from kdpipe.models.io import save_model
from kdpipe.pipeline import run_pipeline
from kdpipe.stages.base import PipelineContext, _source_hash, stage_key
from kdpipe.tracking.store import fetch_verified_artifact, setup_tracking
from tests.conftest import REPO, make_cfg

LINUX_PROC = Path("/proc/self/stat").is_file()
QUICK = ["distill=none", "prune=none", "quantize=none", "export.onnx=false"]


def _stage(stage: str) -> list:
    """Runs of a stage, newest first."""
    return mlflow.search_runs(experiment_names=["kdpipe"], output_format="list",
                              filter_string=f"tags.`kdpipe.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"])


# --- reuse keys cover what is computed -------------------------------------------------------

def _write_classes(root: Path, names=("ants", "bees")) -> None:
    """Two classes told apart by brightness; the same file names in both folders."""
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(24):
            pixels = torch.full((8, 8), 40 + 150 * c + i, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_swapping_two_class_folders_at_the_same_path_recomputes_the_teacher(store, tmp_path):
    root = tmp_path / "images"
    _write_classes(root)
    args = [*QUICK, "data=image_folder", f"data.root={root}", "data.num_classes=2", "data.channels=1",
            "data.height=8", "data.width=8"]
    run_pipeline(make_cfg(args), tmp_path / "a")
    (root / "ants").rename(root / "tmp")  # rename keeps every file's size and mtime
    (root / "bees").rename(root / "ants")
    (root / "tmp").rename(root / "bees")
    run_pipeline(make_cfg(args), tmp_path / "b")
    second, first = _stage("teacher")[:2]
    assert "kdpipe.reused_from" not in second.data.tags
    assert second.data.tags["kdpipe.cache_key"] != first.data.tags["kdpipe.cache_key"]


def test_a_teacher_file_overwritten_behind_a_file_uri_is_loaded_again(store, tmp_path):
    cfg = make_cfg(QUICK)
    arch = OmegaConf.to_container(cfg.teacher.model, resolve=True)
    path = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    save_model(instantiate(cfg.teacher.model), arch, path)
    args = [*QUICK, f"teacher.checkpoint=file://{path}"]
    run_pipeline(make_cfg(args), tmp_path / "a")
    torch.manual_seed(1)
    save_model(instantiate(cfg.teacher.model), arch, path)  # same path, new weights
    run_pipeline(make_cfg(args), tmp_path / "b")
    second, first = _stage("teacher")[:2]
    assert "kdpipe.reused_from" not in second.data.tags
    assert second.data.metrics["test/acc"] != pytest.approx(first.data.metrics["test/acc"]) or \
        second.data.tags["kdpipe.cache_key"] != first.data.tags["kdpipe.cache_key"]


def test_a_truncated_artefact_in_the_store_is_recomputed_not_reused(store, tmp_path):
    run_pipeline(make_cfg(QUICK), tmp_path / "a")
    first = _stage("teacher")[0]
    stored = Path(mlflow.artifacts.download_artifacts(run_id=first.info.run_id, artifact_path="model",
                                                      dst_path=str(tmp_path / "peek")))
    artefact = Path(first.info.artifact_uri.removeprefix("file://")) / "model" / "model.pt"
    assert artefact.is_file() and (stored / "model.pt").is_file()
    artefact.write_bytes(artefact.read_bytes()[:100])
    run_pipeline(make_cfg(QUICK), tmp_path / "b")
    again = _stage("teacher")[0]
    assert again.info.status == "FINISHED" and "kdpipe.reused_from" not in again.data.tags
    with pytest.raises(ValueError, match="is damaged"):  # what the second job found, and said
        fetch_verified_artifact(first, tmp_path / "check")
    assert fetch_verified_artifact(again, tmp_path / "check2").is_file()


def _keys(tmp_path, overrides: list[str]) -> tuple[str, str]:
    cfg = make_cfg(overrides)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ctx = PipelineContext(cfg, dm, tmp_path, "sqlite://")
    return (stage_key(ctx, "teacher", ["teacher", "trainer", "optim", "callbacks"], []),
            stage_key(ctx, "prune", ["prune", "trainer", "optim", "callbacks"], []))


def test_keys_hash_what_is_computed_not_how_it_is_spelled(tmp_path, monkeypatch):
    base = _keys(tmp_path, [])
    # these resolve to the same computation on this machine, or only change what is printed
    for same in (["trainer.accelerator=auto"], ["trainer.devices=auto"], ["prune.one_shot_warn_above=0.9"],
                 ["trainer.log_every_n_steps=1", "trainer.enable_progress_bar=true"], ["data.num_workers=0"]):
        if same == ["trainer.accelerator=auto"] and torch.cuda.is_available():
            continue
        assert _keys(tmp_path, same) == base, same
    # these change what is computed
    assert _keys(tmp_path, ["trainer.max_epochs=2"])[0] != base[0]
    assert _keys(tmp_path, ["data.noise=0.5"])[0] != base[0]  # other data, same key names
    assert _keys(tmp_path, ["prune.sparsity=0.3"])[1] != base[1]
    # other code
    monkeypatch.setattr(kdpipe, "code_version", lambda: "0.1.0+edited")
    assert _keys(tmp_path, [])[0] != base[0]


def test_the_code_hash_changes_with_any_source_edit_and_a_users_target_file_too(tmp_path, monkeypatch):
    pkg = shutil.copytree(Path(kdpipe.__file__).parent, tmp_path / "kdpipe",
                          ignore=shutil.ignore_patterns("__pycache__"))
    before = kdpipe.source_digest(pkg)
    with open(pkg / "losses" / "response.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert kdpipe.source_digest(pkg) != before
    assert kdpipe.code_version().startswith(f"{kdpipe.__version__}+")

    (tmp_path / "my_terms.py").write_text("class Term:\n    scale = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = _source_hash("my_terms.Term")
    (tmp_path / "my_terms.py").write_text("class Term:\n    scale = 2\n")
    assert first is not None and _source_hash("my_terms.Term") != first
    assert _source_hash("torch.nn.Linear") is None  # installed code: its version is not ours to hash


def test_the_data_fingerprint_covers_images_and_labels():
    a, b = SyntheticDataModule(seed=1), SyntheticDataModule(seed=1)
    a.setup(), b.setup()
    assert a.fingerprint == b.fingerprint
    c = SyntheticDataModule(seed=1, noise=0.9)
    c.setup()
    assert c.fingerprint != a.fingerprint


# --- no orphan runs -----------------------------------------------------------------------------

def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(not LINUX_PROC, reason="process start times come from /proc")
def test_runs_of_dead_owners_are_killed_even_when_a_new_process_has_the_same_pid(store, tmp_path):
    exp = setup_tracking(store, "kdpipe")
    client = MlflowClient()
    me = owner_tags()
    boot, pid, start = me[OWNER_TAG].split(":")
    gone = _gone_pid()

    def running(tags: dict) -> str:
        return client.create_run(exp, tags=tags).info.run_id

    alive = running(me)
    as_pid_1_again = running({**me, OWNER_TAG: f"{boot}:{pid}:{int(start) - 1}"})  # a pid reused (PID 1)
    rebooted = running({**me, OWNER_TAG: f"00000000-boot:{pid}:{start}"})
    dead = running({**me, PID_TAG: str(gone), OWNER_TAG: f"{boot}:{gone}:1"})
    elsewhere = running({**me, HOST_TAG: "node17"})
    assert sorted(reap_orphans()) == sorted([as_pid_1_again, rebooted, dead])
    status = {r: client.get_run(r).info.status for r in (alive, as_pid_1_again, rebooted, dead, elsewhere)}
    assert status == {alive: "RUNNING", as_pid_1_again: "KILLED", rebooted: "KILLED", dead: "KILLED",
                      elsewhere: "RUNNING"}

    # kdpipe-doctor: lists what is left; --host repairs the runs of a machine known to be gone
    doctor = [sys.executable, "-m", "kdpipe.tracking.doctor", "--store", store]
    res = subprocess.run(doctor, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"{alive}" in res.stdout and "owner alive" in res.stdout and "owner unknown" in res.stdout
    assert "2 RUNNING run(s): 1 alive, 0 dead, 1 of other hosts" in res.stdout
    res = subprocess.run([*doctor, "--repair", "--host", "node17"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 0 and "1 marked KILLED" in res.stdout, res.stdout + res.stderr
    assert client.get_run(elsewhere).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"
    client.set_terminated(alive)


# --- safe lock files ----------------------------------------------------------------------------

def test_a_planted_symlink_is_never_written_through_and_a_lock_file_is_never_truncated(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_LOCK_DIR", str(tmp_path / "locks"))
    victim = tmp_path / "thesis.tex"
    victim.write_text("four years of work")
    lock_dir()
    lock_path("store|stage-key").symlink_to(victim)
    with pytest.raises(LockError, match="symlink"):
        with exclusive("store|stage-key"):
            pass
    assert victim.read_text() == "four years of work"

    existing = lock_path("other")
    existing.write_text("kept")
    with exclusive("other"):
        pass
    assert existing.read_text() == "kept"


def test_the_default_lock_folder_is_private_per_user_and_another_users_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("KDPIPE_LOCK_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    folder = lock_dir()
    assert folder == tmp_path / f"kdpipe-locks-{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)  # as a folder made by someone else would be: writable by all
    with pytest.raises(LockError, match="belongs to another user or others can write to it"):
        lock_dir()
    folder.rmdir()
    folder.symlink_to(tmp_path)
    with pytest.raises(LockError, match="is a symlink"):
        lock_dir()


# --- SIGTERM by flag ----------------------------------------------------------------------------

def test_sigterm_only_sets_a_flag_that_the_job_checks_so_it_is_never_lost_in_a_gc_callback():
    raised = []

    def in_gc_callback(phase, info):  # Python swallows an exception raised here
        if phase == "start" and not raised:
            raised.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    with on_sigterm():
        gc.callbacks.append(in_gc_callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(in_gc_callback)
        assert raised
        with pytest.raises(Terminated, match="SIGTERM"):
            stop_if_terminated()
    with on_sigterm():  # a new job starts with the flag down
        stop_if_terminated()


# --- a teacher checkpoint URI that names nothing ------------------------------------------------

def test_a_runs_uri_that_names_no_run_fails_in_one_line_before_any_run_exists(store, tmp_path):
    from kdpipe.errors import ConfigError

    bad = "runs:/0123456789abcdef0123456789abcdef/model/model.pt"
    with pytest.raises(ConfigError, match=r"the store .* does not exist, so it holds no run") as err:
        run_pipeline(make_cfg([*QUICK, f"teacher.checkpoint={bad}"]), tmp_path / "a")
    assert "\n" not in str(err.value) and not (tmp_path / "mlflow.db").exists()
    setup_tracking(store, "kdpipe")  # an existing store without that run
    with pytest.raises(ConfigError, match=r"cannot be fetched .*; give a file path or an MLflow URI") as err:
        run_pipeline(make_cfg([*QUICK, f"teacher.checkpoint={bad}"]), tmp_path / "b")
    assert "\n" not in str(err.value)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_loaded_teacher_serves_students_of_every_seed_and_learning_rate_once(store, tmp_path):
    """A teacher given by file does not depend on the seed, the optimiser or the epochs: one teacher
    run and one set of cached logits serve a whole study of students; another file does not."""
    cfg = make_cfg(QUICK)
    arch = OmegaConf.to_container(cfg.teacher.model, resolve=True)
    path = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    save_model(instantiate(cfg.teacher.model), arch, path)
    base = [*QUICK, f"teacher.checkpoint={path}", "distill=kd", "data.seed=0"]  # one split for all
    for i, extra in enumerate([["seed=0"], ["seed=1"], ["seed=1", "optim.lr=0.003", "trainer.max_epochs=2"]]):
        run_pipeline(make_cfg([*base, *extra]), tmp_path / str(i))
    teachers = _stage("teacher")[:3]
    assert len({t.data.tags["kdpipe.cache_key"] for t in teachers}) == 1
    assert all("kdpipe.reused_from" in t.data.tags for t in teachers[:2])
    caches = [r.data.tags.get("kdpipe.teacher_cache") for r in _stage("distill")[:3]]
    assert caches == ["reused", "reused", "computed"]
    torch.manual_seed(1)
    save_model(instantiate(cfg.teacher.model), arch, tmp_path / "other.pt")
    other = [*QUICK, f"teacher.checkpoint={tmp_path / 'other.pt'}", "distill=kd", "data.seed=0"]
    run_pipeline(make_cfg(other), tmp_path / "o")
    assert _stage("teacher")[0].data.tags["kdpipe.cache_key"] != teachers[0].data.tags["kdpipe.cache_key"]

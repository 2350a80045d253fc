"""The real `kdpipe` command in subprocesses: help, config printing, bad input, sweeps."""

from __future__ import annotations

import mlflow
import pytest

from kdpipe.config import validate
from kdpipe.errors import ConfigError
from tests.conftest import FAST, make_cfg, run_cli


def test_help_lists_config_groups_and_their_options(tmp_path):
    res = run_cli(["--help"], tmp_path)
    assert res.returncode == 0
    for group in ("data", "teacher", "student", "distill", "prune", "quantize", "trainer", "tracking"):
        assert f"{group}:" in res.stdout
    distill_line = next(line for line in res.stdout.splitlines() if line.strip().startswith("distill:"))
    for option in ("kd", "dkd", "fitnet", "attention", "rkd", "sp", "dml", "self", "none"):
        assert option in distill_line.replace(",", " ").split(), option


def test_cfg_job_prints_the_composed_config_with_overrides(tmp_path):
    res = run_cli(["--cfg", "job", "distill.temperature=8"], tmp_path)
    assert res.returncode == 0
    assert "temperature: 8" in res.stdout and "_target_: kdpipe.models.cnn" in res.stdout


BAD = [
    (["distill.temperature=0"], "distill.temperature=0"),
    (["distill.temperature=-2"], "must be > 0"),
    (["distill.alpha=1.5"], "distill.alpha=1.5 must lie in [0, 1]"),
    (["prune.sparsity=1.0"], "prune.sparsity=1.0 must lie in [0, 1)"),
    (["teacher.checkpoint=/no/such/teacher.pt"], "teacher.checkpoint=/no/such/teacher.pt does not exist"),
    (["student.model.num_classes=3"], "the student outputs (3,) values per sample but data.num_classes=4"),
    (["teacher.model.num_classes=7"], "the teacher outputs (7,)"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[a[0] for a, _ in BAD])
def test_validate_names_the_bad_value_and_the_fix(args, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(args))
    assert message in str(err.value)


@pytest.mark.parametrize(("args", "message"), [
    (["distill=nonsense"], "Available options in 'distill'"),
    (["distill.alpha=1.5"], "kdpipe: error: distill.alpha=1.5 must lie in [0, 1]"),
], ids=["unknown-option", "alpha"])
def test_bad_input_fails_fast_with_one_clear_line_and_nonzero_exit(tmp_path, args, message):
    res = run_cli([*FAST, *args], tmp_path, {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "mlflow.db").exists(), "nothing may start before the config is validated"


def test_temperature_multirun_trains_one_teacher_and_reuses_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = run_cli(["-m", *FAST, "prune=none", "quantize=none", "distill.temperature=2,4"], tmp_path,
                  {"MLFLOW_TRACKING_URI": uri, "KDPIPE_LOCK_DIR": str(tmp_path / "locks")})
    assert res.returncode == 0, res.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["kdpipe"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline"]
    assert sorted(float(p.data.params["distill.temperature"]) for p in parents) == [2.0, 4.0]
    assert all(p.info.status == "FINISHED" for p in parents)
    teachers = [r for r in runs if r.data.tags.get("kdpipe.stage") == "teacher"]
    assert len(teachers) == 2
    assert sum("kdpipe.reused_from" in t.data.tags for t in teachers) == 1
    assert (tmp_path / "outputs" / "multirun").is_dir()

"""The real `kdpipe` command in subprocesses: help, config printing, bad input, sweeps."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from kdpipe.cli import CONFIG_PATH
from kdpipe.config import validate
from kdpipe.errors import ConfigError
from kdpipe.limits import check_config
from kdpipe.overrides import check
from tests.conftest import REPO, make_cfg, run_cli


def test_help_lists_config_groups_and_their_options(tmp_path):
    res = run_cli(["--help"], tmp_path)
    assert res.returncode == 0
    for group in ("data", "teacher", "student", "distill", "prune", "quantize", "optim", "callbacks",
                  "trainer", "tracking"):
        assert f"{group}:" in res.stdout
    distill_line = next(line for line in res.stdout.splitlines() if line.strip().startswith("distill:"))
    for option in ("kd", "dkd", "fitnet", "attention", "rkd", "sp", "dml", "born_again", "deep_to_shallow",
                   "none"):
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


# Values that need no model: refused by `kdpipe.overrides.check` before torch is imported.
OUT_OF_RANGE = [
    (["distill.temperature=-1"], "distill.temperature=-1 must be > 0"),
    (["distill.temperature=nan"], "distill.temperature=nan must be a finite number"),
    (["distill.alpha=1.5"], "distill.alpha=1.5 must lie in [0, 1]"),
    (["prune.sparsity=1.5"], "prune.sparsity=1.5 must lie in [0, 1)"),
    (["-m", "distill.temperature=2,4,inf"], "distill.temperature=inf must be a finite number"),
    (["-m", "distill=kd,dml", "distill.scheme.peers=1"], "distill.scheme.peers=1 must be >= 2"),
    (["distill=fitnet", "distill.terms.hint.weight=-0.5"], "distill.terms.hint.weight=-0.5 must be >= 0"),
    (["distill=kd", "distill.terms.kd.temperature=inf"], "distill.terms.kd.temperature=inf must be a finite"),
    (["quantize.calibration.num_batches=0"], "quantize.calibration.num_batches=0 must be >= 1"),
    (["prune=agp", "prune.schedule.end_epoch=9"],
     "agp needs start_epoch < end_epoch <= prune.finetune.epochs"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 must be >= 1"),
]


@pytest.mark.parametrize(("args", "message"), OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_a_value_out_of_range_is_refused_when_the_command_line_is_checked(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        check(args, CONFIG_PATH)
    assert "\n" not in str(err.value)


def test_the_command_line_check_imports_no_torch_lightning_or_mlflow(tmp_path):
    """`check` and the preflight (`kdpipe.preflight`) on sweeps, data of every format (refusals
    included), a teacher checkpoint and a tracking server import none of the heavy libraries."""
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / name / "0.png")
    (tmp_path / "teacher.pt").write_text("text")
    code = ("import sys\n"
            "from kdpipe.cli import CONFIG_PATH\n"
            "from kdpipe.errors import ConfigError\n"
            "from kdpipe.overrides import check\n"
            "from kdpipe.preflight import check_command\n"
            "check(['-m', 'distill=kd,dkd', 'distill.temperature=1,4', 'prune=agp'], CONFIG_PATH)\n"
            f"t = {str(tmp_path)!r}\n"
            "for args in (['distill.temperature=-1'], ['-m', 'distill=kd,dkd', 'prune=agp'],\n"
            "             ['data=fashion_mnist'], ['data=mnist', 'data.root=' + t],\n"
            "             ['data=image_folder', 'data.root=' + t + '/images'],\n"
            "             ['data=cifar10', 'data.root=' + t], ['teacher.checkpoint=' + t + '/teacher.pt'],\n"
            "             ['tracking.uri=http://127.0.0.1:9']):\n"
            "    try:\n"
            "        check_command(args, check(args, CONFIG_PATH))\n"
            "    except ConfigError:\n"
            "        pass\n"
            "heavy = ('torch', 'lightning', 'pytorch_lightning', 'mlflow', 'pandas', 'kdpipe.config')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_every_swept_value_of_an_experiment_file_is_checked_and_the_command_line_wins(tmp_path):
    conf = shutil.copytree(CONFIG_PATH, tmp_path / "conf")
    (conf / "experiment" / "bad_ladder.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      prune.sparsity: 0.5,0.95,1.0\n"
        "      quantize: none,dynamic\n")
    with pytest.raises(ConfigError, match=r"prune.sparsity=1.0 must lie in \[0, 1\)"):
        check(["-m", "experiment=bad_ladder"], str(conf))
    check(["-m", "experiment=bad_ladder", "prune.sparsity=0.5,0.9"], str(conf))
    check(["-m", "experiment=compression_ladder"], CONFIG_PATH)


def _terms_layout(**distill) -> DictConfig:
    """The distill layout of `name`, `terms: {name: {_target_, weight, ...}}` and `scheme`."""
    base = {"name": "kd", "temperature": 4.0, "alpha": 0.9,
            "terms": {"ce": {"_target_": "kdpipe.losses.CrossEntropy", "weight": 0.1},
                      "kd": {"_target_": "kdpipe.losses.SoftTargetKL", "weight": 0.9,
                             "temperature": "${distill.temperature}"}},
            "scheme": {"_target_": "kdpipe.distill.Offline"}}
    return OmegaConf.create({"distill": OmegaConf.merge(base, distill)})


@pytest.mark.parametrize(("distill", "message"), [
    ({"terms": {"kd": {"weight": -1}}}, "distill.terms.kd.weight=-1 must be >= 0"),
    ({"temperature": 0}, "distill.temperature=0 must be > 0"),  # the key set, not the term reading it
    ({"terms": {"kd": {"temperature": float("inf")}}}, "distill.terms.kd.temperature=inf must be a finite"),
    ({"scheme": {"temperature": -3}}, "distill.scheme.temperature=-3 must be > 0"),
    ({"alpha": 2}, "distill.alpha=2 must lie in [0, 1]"),
], ids=["term-weight", "temperature", "term-temperature", "scheme-temperature", "alpha"])
def test_distill_ranges_hold_for_the_terms_and_scheme_layout(distill, message):
    check_config(_terms_layout())
    with pytest.raises(ConfigError) as err:
        check_config(_terms_layout(**distill))
    assert str(err.value).startswith(message)

"""Every bad input to the real `kdpipe` command ends in one clear line, exit 2, before anything is
created: the table of `tests/bad_inputs.py`, each row run through the CLI in an empty directory
that holds its tracking store. The wall time of each refusal is collected and summarised at the
end of the module (rows, rejected cleanly, median seconds to reject)."""

from __future__ import annotations

import shlex
import statistics
import subprocess
import zipfile

import pytest
import torch

from kdpipe.cli import CONFIG_PATH
from kdpipe.data.checks import cifar_files
from kdpipe.errors import ConfigError
from kdpipe.overrides import check
from kdpipe.preflight import check_command, torch_file_problem
from tests.bad_inputs import ROWS, make_data, problems, run_row, unshare_works
from tests.conftest import run_cli

# The module-scoped fixtures are built once: all of this module's tests run in one worker.
pytestmark = pytest.mark.xdist_group("bad_inputs")

TIMES: list[tuple[str, float, bool]] = []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """One line at the end: how many rows, how many rejected cleanly, the median time to reject."""
    yield
    if not TIMES:
        return
    fast = [t for row_id, t, _ in TIMES if not next(r for r in ROWS if r.id == row_id).needs_torch]
    line = (f"bad inputs: {len(TIMES)} rows run, {sum(ok for *_, ok in TIMES)} rejected cleanly, median "
            f"{statistics.median(t for _, t, _ in TIMES):.2f} s to reject ({len(fast)} before torch: median "
            f"{statistics.median(fast):.2f} s, max {max(fast):.2f} s)" if fast else "")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and line:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(line)


_UNSHARE = None


def _can_mount() -> bool:
    global _UNSHARE
    if _UNSHARE is None:
        _UNSHARE = unshare_works()
    return _UNSHARE


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_bad_input_exits_2_with_one_line_naming_it_and_the_fix_and_creates_nothing(row, data, tmp_path):
    if row.mount and not _can_mount():
        pytest.skip("`unshare -rm true` fails here: no private user+mount namespace to mount a "
                    "read-only or full tmpfs in")
    if row.needs_torch and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: trainer.accelerator=gpu is valid here")
    cwd, mnt = tmp_path / "cwd", tmp_path / "mnt"
    cwd.mkdir()
    mnt.mkdir()
    res, seconds = run_row(row, data, cwd, mnt, run_cli)
    found = problems(row, data, res, cwd, mnt)
    TIMES.append((row.id, seconds, not found))
    assert not found, "\n".join(found)
    assert not list(mnt.iterdir()), "the write probe must leave nothing behind"


def test_the_table_covers_each_kind_of_bad_input():
    assert len(ROWS) >= 30
    assert sum(r.needs_torch for r in ROWS) == 1, "rows whose check imports torch cost ~2 s each"


def test_preflight_passes_the_real_fashion_mnist_files_and_a_sweep(tmp_path, monkeypatch):
    """No false alarm: the installed Fashion-MNIST files, a valid sweep, a writable store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for args in (["data=fashion_mnist"], ["-m", "distill=kd,dkd", "distill.temperature=1,4"], []):
        check_command(args, check(args, CONFIG_PATH))
    assert not list(tmp_path.iterdir())


def test_torch_file_problem_accepts_what_torch_save_writes_and_names_what_is_not(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch_file_problem(tmp_path / "state.pt") is None
    assert torch_file_problem(tmp_path / "legacy.pt") is None
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    assert "without a */data.pkl member" in torch_file_problem(tmp_path / "other.zip")
    assert torch_file_problem(tmp_path / "none.pt") == "does not exist"
    assert torch_file_problem(tmp_path).startswith("is a folder")


def test_the_cifar_download_hint_pastes_into_a_shell_as_one_path(tmp_path):
    """The printed `mkdir -p ...` creates the folder with the odd name and runs nothing in it."""
    odd = tmp_path / "x; touch pwned $(touch pwned2)"
    with pytest.raises(ConfigError) as err:
        cifar_files(odd)
    command = str(err.value).split("Get them with: ")[1].split(" && curl")[0]
    assert command == f"mkdir -p {shlex.quote(str(odd))}"
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True)
    assert odd.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [odd.name]

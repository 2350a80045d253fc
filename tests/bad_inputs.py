"""The table of bad inputs to the real `kdpipe` command, shared by `tests/test_bad_inputs.py` and
`scripts/bench_bad_inputs.py`.

Each row is a command line (with `{name}` placeholders for the broken files `make_data` writes),
the fragments its one error line must hold (the key or path, and the fix), and how to run it: in
a private mount namespace over a read-only or a full tmpfs for the rows about unwritable folders.
A row is rejected cleanly when the command exits 2 with exactly one line on stderr, starting
`kdpipe: error: ` and holding every fragment, no traceback, and its working directory (where the
tracking store, the run folders, the checkpoints, the locks and the caches would go) still empty.
"""

from __future__ import annotations

import gzip
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kdpipe.data.idx import write_idx
from tests.conftest import FAST

PREFIX = "kdpipe: error: "
FIX_IDX = "reinstall with: apt-get update && apt-get install -y --reinstall dataset-fashion-mnist"
TIMEOUT_S = 180


@dataclass(frozen=True)
class Row:
    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    mount: str | None = None  # "ro" or "full": a tmpfs at {mnt}, in a private user+mount namespace
    needs_torch: bool = False  # refused before the job too, but the check imports torch (about 2 s)


def _row(id: str, args: str | list[str], *expect: str, **kw) -> Row:
    return Row(id, tuple(args.split() if isinstance(args, str) else args), expect, **kw)


ROWS = [
    # IDX (data=fashion_mnist, data=mnist)
    _row("idx-missing-files", "data=fashion_mnist data.root={empty}",
         "data.root={empty} lacks train-images-idx3-ubyte",
         "apt-get install -y --reinstall dataset-fashion-mnist"),
    _row("idx-truncated-raw", "data=fashion_mnist data.root={idx_trunc_raw}",
         "{idx_trunc_raw}/train-images-idx3-ubyte is truncated or corrupt "
         "(expected 47056 bytes, found 30000)",
         FIX_IDX),
    _row("idx-truncated-gz", "data=fashion_mnist data.root={idx_trunc_gz}",
         "{idx_trunc_gz}/train-images-idx3-ubyte.gz is truncated or corrupt (expected 47056 bytes, found ",
         FIX_IDX),
    _row("idx-600-images-100-labels", "data=fashion_mnist data.root={idx_count}",
         "train-images-idx3-ubyte holds 600 images but train-labels-idx1-ubyte holds 100 labels", FIX_IDX),
    _row("idx-label-255", "data=fashion_mnist data.root={idx_255}",
         "{idx_255}/train-labels-idx1-ubyte holds label 255, outside [0, data.num_classes=10)"),
    _row("idx-int8-label-minus-1", "data=mnist data.root={idx_neg}",
         "{idx_neg}/t10k-labels-idx1-ubyte.gz holds label -1, outside [0, data.num_classes=10)"),
    # image folders
    _row("image-folder-one-class", "data=image_folder data.root={img_one}",
         "one class found under {img_one} (cat); classification needs at least two class folders"),
    _row("image-folder-corrupt-image", "data=image_folder data.root={img_corrupt}",
         "cannot read image {img_corrupt}/dog/0.png: ", "; remove or replace it"),
    _row("image-folder-class-count", "data=image_folder data.root={img_three}",
         "{img_three} has 3 class folders (cat, dog, eel) but data.num_classes=2", "set data.num_classes=3"),
    _row("image-folder-missing-root", "data=image_folder data.root={empty}/photos",
         "data.root={empty}/photos does not exist; give a folder with one sub-folder per class"),
    _row("image-folder-no-root", "data=image_folder", "data=image_folder needs data.root="),
    _row("image-folder-empty-split", "data=image_folder data.root={img_empty_test}",
         "no image files", "under the test folders of {img_empty_test}"),
    _row("image-folder-bad-root-in-sweep",
         ["-m", "data=image_folder", "data.root={img_two},{empty}/photos"],
         "data.root={empty}/photos does not exist"),
    # CIFAR: the download hint quotes the path for the shell
    _row("cifar-missing-root-quoted", ["data=cifar10", "data.root='{cifar_odd}'"],
         "lacks the cifar10 batch files data_batch_1",
         "Get them with: mkdir -p {cifar_odd_quoted} && curl -L "
         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz | tar xz -C {cifar_odd_quoted}"),
    # teacher.checkpoint
    _row("teacher-text-file", "teacher.checkpoint={teacher_txt}",
         "teacher.checkpoint={teacher_txt} is not a torch checkpoint (torch.save writes a zip archive); "
         "give a kdpipe model.pt, a Lightning .ckpt or a state-dict file"),
    _row("teacher-missing-path", "teacher.checkpoint={empty}/teacher.pt",
         "teacher.checkpoint={empty}/teacher.pt does not exist; give a file path or an MLflow URI"),
    _row("teacher-missing-file-uri", "teacher.checkpoint=file:///no/such/teacher.pt",
         "teacher.checkpoint=file:///no/such/teacher.pt does not exist"),
    # tracking
    _row("tracking-server-not-listening", "tracking=server",
         "tracking.uri=http://127.0.0.1:{port} does not answer (Connection refused); start a server "
         "(kdpipe-ui --store sqlite:///server.db --artifacts ./mlartifacts) or use tracking=local",
         env={"KDPIPE_TRACKING_SERVER": "http://127.0.0.1:{port}"}),
    _row("empty-experiment", "tracking.experiment=", "tracking.experiment='' is empty",
         "tracking.experiment=kdpipe"),
    # data values
    _row("num-classes-1", "data.num_classes=1", "data.num_classes=1 must be >= 2",
         "classification needs at least two classes"),
    _row("val-fraction-0", "data.val_fraction=0", "data.val_fraction=0 must lie in (0, 1)"),
    _row("fractions-sum-1.1", "data.val_fraction=0.5 data.test_fraction=0.6",
         "data.val_fraction=0.5 + data.test_fraction=0.6 = 1.1 leaves no training split"),
    # typed, ranged and finite values of the README's options
    _row("temperature-nan", "distill.temperature=nan", "distill.temperature=nan must be a finite number"),
    _row("temperature-inf", "distill.temperature=inf", "distill.temperature=inf must be a finite number"),
    _row("temperature-negative", "distill.temperature=-1", "distill.temperature=-1 must be > 0"),
    _row("temperature-hot", "distill.temperature=hot",
         "distill.temperature=hot: distill.temperature takes a number", "e.g. distill.temperature=2.0"),
    _row("alpha-1.5", "distill.alpha=1.5", "distill.alpha=1.5 must lie in [0, 1]"),
    _row("max-epochs-negative", "trainer.max_epochs=-1", "trainer.max_epochs=-1 must be >= 1"),
    _row("max-epochs-2.5", "trainer.max_epochs=2.5",
         "trainer.max_epochs=2.5: trainer.max_epochs takes an integer"),
    _row("batch-size-0", "data.batch_size=0", "data.batch_size=0 must be >= 1"),
    _row("lr-0", "optim.lr=0", "optim.lr=0 must be > 0"),
    _row("lr-nan", "optim.lr=nan", "optim.lr=nan must be a finite number"),
    _row("sparsity-1.0", "prune.sparsity=1.0", "prune.sparsity=1.0 must lie in [0, 1)"),
    _row("sparsity-abc", "prune.sparsity=abc", "prune.sparsity=abc: prune.sparsity takes a number"),
    _row("calibration-batches-0", "quantize.calibration.num_batches=0",
         "quantize.calibration.num_batches=0 must be >= 1"),
    _row("seed-abc", "seed=abc", "seed=abc: seed takes an integer"),
    _row("exits-budget-negative", "exits.max_acc_drop=-1", "exits.max_acc_drop=-1 must be >= 0"),
    _row("misspelled-key", "distill.temprature=4",
         "distill.temprature=4: 'distill' has no key 'temprature' (did you mean distill.temperature?)",
         "+distill.temprature=4"),
    _row("unknown-group-option", "distill=nonsense", "Could not find 'distill/nonsense'",
         "Available options in 'distill'"),
    _row("bad-value-in-sweep", "-m prune.sparsity=0.5,1.5", "prune.sparsity=1.5 must lie in [0, 1)"),
    # folders the job writes: really read-only and really full file systems
    _row("run-dir-read-only", "hydra.run.dir={mnt}/run",
         "hydra.run.dir={mnt}/run: cannot write under {mnt} (Read-only file system); "
         "point hydra.run.dir at a writable folder", mount="ro"),
    _row("run-dir-full-disk", "hydra.run.dir={mnt}/run",
         "hydra.run.dir={mnt}/run: cannot write under {mnt} (No space left on device); free space",
         mount="full"),
    _row("store-read-only", "tracking.uri=sqlite:///{mnt}/mlflow.db",
         "tracking.uri=sqlite:///{mnt}/mlflow.db: cannot write under {mnt} (Read-only file system)",
         mount="ro"),
    # the one check that imports torch (whether it finds a GPU), still before the job starts
    _row("accelerator-gpu-without-gpu", "trainer.accelerator=gpu",
         "trainer.accelerator=gpu: torch finds no GPU here", "use trainer.accelerator=cpu", needs_torch=True),
]


def with_fast(args: tuple[str, ...]) -> list[str]:
    """`args` after the FAST settings that they do not override: a row that a bug let through
    would train for seconds, not minutes."""
    given = {a.split("=")[0] for a in args}
    return [*(a for a in FAST if a.split("=")[0] not in given), *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _idx_set(root: Path, gz: bool = False, n_train: int = 60, n_test: int = 20,
             n_train_labels: int | None = None, labels_dtype=np.uint8) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    ext = ".gz" if gz else ""
    for split, n, n_lab in (("train", n_train, n_train_labels or n_train), ("t10k", n_test, n_test)):
        write_idx(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), root / f"{split}-images-idx3-ubyte{ext}")
        write_idx(rng.integers(0, 10, n_lab).astype(labels_dtype), root / f"{split}-labels-idx1-ubyte{ext}")
    return root


def _images(root: Path, classes: tuple[str, ...], per_class: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def make_data(root: Path) -> dict[str, str]:
    """Write the broken inputs of the table under `root`; returns the placeholder values."""
    import shlex

    d: dict[str, Path | str] = {"empty": root / "empty"}
    (root / "empty").mkdir(parents=True)

    d["idx_trunc_raw"] = _idx_set(root / "idx-trunc-raw")
    with open(d["idx_trunc_raw"] / "train-images-idx3-ubyte", "r+b") as fh:
        fh.truncate(30000)
    d["idx_trunc_gz"] = _idx_set(root / "idx-trunc-gz", gz=True)
    gz = d["idx_trunc_gz"] / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    d["idx_count"] = _idx_set(root / "idx-count", n_train=600, n_train_labels=100)
    d["idx_255"] = _idx_set(root / "idx-255")
    labels = bytearray((d["idx_255"] / "train-labels-idx1-ubyte").read_bytes())
    labels[8 + 7] = 255
    (d["idx_255"] / "train-labels-idx1-ubyte").write_bytes(bytes(labels))
    d["idx_neg"] = _idx_set(root / "idx-neg", gz=True, labels_dtype=np.int8)
    neg = d["idx_neg"] / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(neg.read_bytes()))
    raw[8 + 3] = 0xFF  # int8 -1
    neg.write_bytes(gzip.compress(bytes(raw)))

    d["img_one"] = _images(root / "img-one", ("cat",))
    d["img_two"] = _images(root / "img-two", ("cat", "dog"))
    d["img_three"] = _images(root / "img-three", ("cat", "dog", "eel"))
    d["img_corrupt"] = _images(root / "img-corrupt", ("cat", "dog"))
    (d["img_corrupt"] / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    d["img_empty_test"] = _images(root / "img-empty-test" / "train", ("cat", "dog")).parent
    for name in ("cat", "dog"):
        (d["img_empty_test"] / "test" / name).mkdir(parents=True)

    d["cifar_odd"] = root / "cifar dir; $(touch pwned)"
    d["cifar_odd_quoted"] = shlex.quote(str(d["cifar_odd"]))
    d["teacher_txt"] = root / "teacher.pt"
    d["teacher_txt"].write_text("not a checkpoint\n")
    d["port"] = str(_free_port())
    return {k: str(v) for k, v in d.items()}


def unshare_works() -> bool:
    """Whether this machine lets an unprivileged user namespace mount a tmpfs."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_MOUNT = {
    "ro": 'mount -t tmpfs -o ro tmpfs "$dir" && exec "$py" -m kdpipe "$@"',
    "full": 'mount -t tmpfs -o size=16k tmpfs "$dir" && { head -c 1M /dev/zero > "$dir/fill" 2>/dev/null; '
            'exec "$py" -m kdpipe "$@"; }',
}


def run_row(row: Row, data: dict[str, str], cwd: Path, mnt: Path,
            run_cli: Callable[..., subprocess.CompletedProcess]) -> tuple[subprocess.CompletedProcess, float]:
    """Run the row's command in `cwd` (empty), its store in `cwd`; `mnt` is an empty folder for a
    mount. Returns the process and its wall time."""
    values = {**data, "mnt": str(mnt)}
    args = [a.format(**values) for a in with_fast(row.args)]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", "KDPIPE_LOCK_DIR": str(cwd / "locks"),
           "KDPIPE_CACHE_DIR": str(cwd / "cache"), **{k: v.format(**values) for k, v in row.env.items()}}
    start = time.perf_counter()
    if row.mount is None:
        res = run_cli(args, cwd, env, timeout=TIMEOUT_S)
    else:
        script = f'dir=$1; py=$2; shift 2; {_MOUNT[row.mount]}'
        res = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mnt), sys.executable, *args],
                             cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    return res, time.perf_counter() - start


def leftovers(cwd: Path) -> list[str]:
    """What the command left in its working directory (nothing, for a refused command); runs in a
    store left there are counted."""
    found = sorted(p.name for p in cwd.iterdir())
    db = cwd / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            try:
                found.append(f"{con.execute('SELECT COUNT(*) FROM runs').fetchone()[0]} runs in mlflow.db")
            except sqlite3.Error:
                pass
    return found


def problems(row: Row, data: dict[str, str], res: subprocess.CompletedProcess, cwd: Path,
             mnt: Path) -> list[str]:
    """Why the row was not rejected cleanly (an empty list when it was)."""
    values = {**data, "mnt": str(mnt)}
    out = []
    if res.returncode != 2:
        out.append(f"exit code {res.returncode}, not 2")
    lines = res.stderr.strip().splitlines()
    if len(lines) != 1:
        out.append(f"{len(lines)} lines on stderr, not 1")
    if "Traceback" in res.stderr:
        out.append("a traceback on stderr")
    line = lines[-1] if lines else ""
    if not line.startswith(PREFIX):
        out.append(f"the line does not start with {PREFIX!r}")
    out += [f"no {e!r} in the line" for e in (e.format(**values) for e in row.expect) if e not in line]
    left = leftovers(cwd)
    if left:
        out.append(f"left behind: {left}")
    if out:
        out.append(f"stderr: {res.stderr[-2000:]}")
    return out

"""Checks of a composed config against the machine it is about to run on, before Hydra starts a job.

`kdpipe.overrides.check` holds every value to its type and range; this module then checks what the
config points at, so that a bad input fails in one line naming the key or the file and the fix,
exit 2, before Hydra creates the run folder, before torch is imported and before anything is
written to the tracking store:

- the data files of the chosen `data` option (`kdpipe.data.checks`: the same functions the data
  modules call when they load, so Python users get the same errors);
- `teacher.checkpoint` given as a path or a `file://` URI: a file that `torch.save` wrote;
- the folders the job will write: `hydra.run.dir` (`hydra.sweep.dir` for a multirun),
  `checkpoint_dir` and the folder of a `sqlite:///` tracking store, each probed by writing (and
  removing) a small file in its nearest existing ancestor: as root, permission bits do not stop a
  write, so only a real write finds a read-only mount or a full disk;
- an `http(s)://` tracking server, asked for `/health` (3 s), instead of MLflow's retries;
- an empty `tracking.experiment`.

Imports neither torch, Lightning, MLflow nor pandas. `KDPIPE_NO_PREFLIGHT=1` skips these checks
(for example when the data exist only on the nodes a SLURM launcher sends the jobs to).
"""

from __future__ import annotations

import errno
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdpipe import limits
from kdpipe.data import checks as data_checks
from kdpipe.errors import ConfigError

SERVER_TIMEOUT_S = 3.0
START_SERVER = "kdpipe-ui --store sqlite:///server.db --artifacts ./mlartifacts"
_PROBE_BYTES = 4096
# The first bytes of a file of torch.save's legacy (pre-1.6, non-zip) format: pickle protocol 2
# and the magic number 0x1950a86a20f9469cfc6c it pickles first.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

_UNRESOLVED = object()


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """The resolved value at `key`; `default` when absent; `_UNRESOLVED` when it resolves only in
    the running job (a `${hydra:...}` interpolation): such a value is left to the job."""
    try:
        return OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=True)
    except OmegaConfBaseException:
        return _UNRESOLVED


# ---------------------------------------------------------------------------------------------
# Checkpoints


def torch_file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with `path` as a file `torch.load` reads, or None if nothing is: it exists,
    is a file, and is a zip archive with a `<name>/data.pkl` member (what `torch.save` writes
    since torch 1.6; the legacy pickle format is accepted too). Reads the zip directory only.

    The answer is a phrase to put after the path or key, e.g.
    `f"teacher.checkpoint={ref} {problem}"`."""
    path = Path(os.path.expanduser(str(path)))
    fix = "give a kdpipe model.pt, a Lightning .ckpt or a state-dict file"
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return f"is a folder, not a file; {fix}"
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_LEGACY_TORCH_MAGIC))
        if head == _LEGACY_TORCH_MAGIC:
            return None
        if not zipfile.is_zipfile(path):
            return f"is not a torch checkpoint (torch.save writes a zip archive); {fix}"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc}); {fix}"
    if not any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
        return f"is a zip archive without a */data.pkl member, not a torch checkpoint; {fix}"
    return None


def local_checkpoint(ref: str) -> Path | None:
    """The local file of a checkpoint given as a path or a `file://` URI; None for any other URI
    (`runs:/`, `models:/`, `http(s)://`...), which only the job can fetch."""
    if ref.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(ref)
        if parsed.netloc not in ("", "localhost"):
            return None
        return Path(unquote(parsed.path))
    if "://" in ref or ref.startswith(("runs:/", "models:/")):
        return None
    return Path(os.path.expanduser(ref))


def teacher_checkpoint_problem(ref: Any) -> str | None:
    """The one-line error for `teacher.checkpoint=ref`, or None (also for a URI the job fetches)."""
    if not ref:
        return None
    path = local_checkpoint(str(ref))
    if path is None:
        return None
    problem = torch_file_problem(path)
    if problem == "does not exist":
        return (f"teacher.checkpoint={ref} does not exist; give a file path or an MLflow URI "
                f"(runs:/<run_id>/model/model.pt), or null to train the teacher")
    return None if problem is None else f"teacher.checkpoint={ref} {problem}"


# ---------------------------------------------------------------------------------------------
# Folders the job writes


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_probe(folder: Path) -> OSError | None:
    """Create a small file in `folder`, write 4 KiB to it and remove it; the error, if any. Random
    bytes, so that a compressing file system stores them too."""
    name = folder / f".kdpipe-probe-{os.getpid()}-{os.urandom(4).hex()}"
    error, fd = None, None
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        left = memoryview(os.urandom(_PROBE_BYTES))
        while left:
            left = left[os.write(fd, left):]
    except OSError as exc:
        error = exc
    finally:
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:  # a network file system reports a failed write on close
                error = error or exc
            try:
                os.unlink(name)
            except OSError:
                pass
    return error


def writable_problem(key: str, shown: str, path: str | os.PathLike, fix: str | None = None,
                     probed: dict | None = None) -> str | None:
    """The one-line error when nothing can be created at `path` (the value `shown` of `key`):
    its nearest existing ancestor is not a folder, or a probe file cannot be written there.
    `probed` caches the probe of each folder within one command."""
    fix = fix or f"point {key} at a writable folder"
    folder = _nearest_existing(Path(os.path.abspath(os.path.expanduser(str(path)))))
    if not folder.is_dir():
        return f"{key}={shown}: {folder} is a file, not a folder; {fix}"
    probed = {} if probed is None else probed
    if folder not in probed:
        probed[folder] = write_probe(folder)
    exc = probed[folder]
    if exc is None:
        return None
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space or point {key} at another folder"
    return f"{key}={shown}: cannot write under {folder} ({reason}); {fix}"


def _raw(cfg: DictConfig, key: str) -> str | None:
    """The value at `key` as written, interpolations unresolved."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return None
    value = OmegaConf.to_container(node, resolve=False).get(leaf)
    return None if value is None else str(value)


def output_dir(cfg: DictConfig, multirun: bool = False) -> tuple[str, str] | None:
    """(key, folder) of the job's output: `hydra.run.dir`, or `hydra.sweep.dir` for a multirun,
    resolved as Hydra will (`${now:...}` at this moment). A value that resolves only in the job
    gives its fixed part (`outputs/` of `outputs/${hydra.job.name}`)."""
    if "hydra" not in cfg:
        return None
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    raw = _raw(cfg, key) or ""
    value = _get(cfg, key)
    if value is _UNRESOLVED:
        value = os.path.dirname(raw.split("${")[0]) or "."
    return None if value is None else (key, str(value))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative: `sqlite:///mlflow.db`; absolute:
    `sqlite:////abs/mlflow.db`); None for any other store or an in-memory one."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri[len("sqlite:///"):].split("?")[0]
    return Path(database) if database and database != ":memory:" else None


def server_problem(uri: str, timeout: float = SERVER_TIMEOUT_S) -> str | None:
    """Why the tracking server at `uri` does not answer `GET <uri>/health`, or None if it does.
    A client error (4xx, e.g. 401 of a server behind a login) is an answer; a 5xx is not."""
    import socket
    import ssl
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code} from /health"
    except urllib.error.URLError as exc:
        reason = exc.reason
    except (OSError, ValueError) as exc:  # a timeout while reading; a malformed URI
        reason = exc
    if isinstance(reason, ssl.SSLError):  # it answered; its certificate is MLflow's business
        return None                       # (MLFLOW_TRACKING_SERVER_CERT_PATH, ..._INSECURE_TLS)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return " ".join(str(reason).split()) or type(reason).__name__


# ---------------------------------------------------------------------------------------------
# Data


def _idx(data: dict) -> None:
    shape = (data.get("channels", 1), data.get("height", 28), data.get("width", 28))
    data_checks.check_idx(data["root"], data.get("install_hint") or "", data.get("num_classes"), shape)


def _image_folder(data: dict) -> None:
    if data.get("channels", 3) not in (1, 3):
        raise ConfigError(f"data.channels={data['channels']}: image_folder reads grey (1) or RGB (3) images")
    data_checks.check_image_folder(data.get("root"), data.get("num_classes", 2))


def _cifar(data: dict) -> None:
    data_checks.cifar_files(data["root"], data.get("variant", "cifar10"))


DATA_CHECKS = {"IDXDataModule": _idx, "ImageFolderDataModule": _image_folder, "CIFARDataModule": _cifar}


def check_data(data: DictConfig | dict) -> None:
    """The files of a `data` config of kdpipe's own formats (`kdpipe.data.checks`)."""
    values = _resolved(data)
    target = str((values or {}).get("_target_") or "")
    check = DATA_CHECKS.get(target.rsplit(".", 1)[-1]) if target.startswith("kdpipe.data.") else None
    if check is not None:
        check(values)


def _resolved(node: DictConfig | dict) -> dict | None:
    """`node` as a plain dict, resolved; None when a value resolves only in the job (the data
    module checks it then)."""
    if isinstance(node, dict):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:
        return None


# ---------------------------------------------------------------------------------------------
# The whole config


def preflight(cfg: DictConfig, multirun: bool = False, memo: dict | None = None) -> None:
    """Raise `ConfigError` (one line naming the key or the path, and the fix) on the first thing
    `cfg` points at that cannot work here. `cfg` is composed with Hydra's node (for the output
    folder; without it that check is skipped). `memo` skips what an earlier config of the same
    command checked already (the configs of a sweep share most of their values)."""
    memo = {} if memo is None else memo
    probed = memo.setdefault("probed", {})
    done = memo.setdefault("done", set())

    def first_time(*what: Any) -> bool:
        if what in done:
            return False
        done.add(what)
        return True

    accelerator = _get(cfg, "trainer.accelerator") if "trainer" in cfg else None
    if isinstance(accelerator, str):
        problem = accelerator_problem(accelerator)
        if problem:
            raise ConfigError(problem)

    if "tracking" in cfg:
        experiment = _get(cfg, "tracking.experiment")
        if experiment is not _UNRESOLVED:
            limits.name(experiment, "tracking.experiment")

    ref = _get(cfg, "teacher.checkpoint") if cfg.get("teacher") is not None else None
    if ref is not _UNRESOLVED and first_time("teacher", ref):
        problem = teacher_checkpoint_problem(ref)
        if problem:
            raise ConfigError(problem)

    data = cfg.get("data")
    values = _resolved(data) if isinstance(data, DictConfig) else None
    if values is not None and first_time("data", repr(values)):
        check_data(values)

    where = output_dir(cfg, multirun)
    folders = [where] if where else []
    ckpt = _get(cfg, "checkpoint_dir")
    if isinstance(ckpt, str) and ckpt:
        folders.append(("checkpoint_dir", ckpt))
    uri = _get(cfg, "tracking.uri") if "tracking" in cfg else None
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = None if uri is _UNRESOLVED or not uri else str(uri)
    for key, path in folders:
        problem = writable_problem(key, path, path, probed=probed)
        if problem:
            raise ConfigError(problem)
    db = sqlite_path(uri) if uri else None
    if db is not None:
        problem = writable_problem("tracking.uri", uri, db.parent, probed=probed,
                                   fix="point tracking.uri (or MLFLOW_TRACKING_URI) at a writable folder")
        if problem:
            raise ConfigError(problem)

    if uri and uri.startswith(("http://", "https://")) and first_time("server", uri):
        reason = server_problem(uri)
        if reason:
            raise ConfigError(f"tracking.uri={uri} does not answer ({reason}); start a server "
                              f"({START_SERVER}) or use tracking=local")


def accelerator_problem(accelerator: str) -> str | None:
    """Why `trainer.accelerator=<accelerator>` cannot run here (a GPU asked for where torch finds
    none), or None. Imports torch, but only when a GPU is asked for: the usual `cpu` and `auto`
    need no check, and the command line stays torch-free for them."""
    accelerator = str(accelerator).lower()
    if accelerator not in ("gpu", "cuda", "mps"):
        return None
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (accelerator == "cuda" and not cuda) or (accelerator == "gpu" and not (cuda or mps)):
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return (f"trainer.accelerator={accelerator}: torch finds no GPU here (torch.cuda.is_available() "
                f"is False; torch {torch.__version__}, {build}); use trainer.accelerator=cpu, or auto to "
                f"take a GPU when there is one")
    if accelerator == "mps" and not mps:
        return ("trainer.accelerator=mps: torch finds no Apple GPU here (torch.backends.mps.is_available() "
                "is False); use trainer.accelerator=cpu or auto")
    return None


def is_multirun(args: Sequence[str], cfg: DictConfig | None = None) -> bool:
    """`-m`/`--multirun` on the command line, or `hydra.mode: MULTIRUN` in the config."""
    if any(a in ("-m", "--multirun") for a in args):
        return True
    return cfg is not None and str(_get(cfg, "hydra.mode")) in ("MULTIRUN", "RunMode.MULTIRUN")


def check_command(args: Sequence[str], configs: Sequence[DictConfig]) -> None:
    """`preflight` on each config `kdpipe.overrides.check` composed for the command line `args`
    (one per option of a swept group and per value of a swept key), unless the command runs no
    job (`--help`, `--cfg`) or KDPIPE_NO_PREFLIGHT is set."""
    from kdpipe.overrides import runs_a_job

    if not configs or not runs_a_job(args) or os.environ.get("KDPIPE_NO_PREFLIGHT", "") not in ("", "0"):
        return
    multirun = is_multirun(args, configs[0])
    memo: dict = {}
    for cfg in configs:
        preflight(cfg, multirun, memo)

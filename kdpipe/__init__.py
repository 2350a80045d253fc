"""kdpipe: declarative pipelines for knowledge distillation and model compression."""

import functools
import hashlib
import os
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"


def source_digest(root: Path) -> str:
    """A hash of the names and contents of every `.py` file under `root`."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def cache_dir(name: str) -> Path:
    """`$KDPIPE_CACHE_DIR/<name>` (default `~/.cache/kdpipe/<name>`): what kdpipe keeps between jobs
    (normalisation statistics, tokenizers, the MLflow schema template)."""
    return Path(os.environ.get("KDPIPE_CACHE_DIR", Path.home() / ".cache" / "kdpipe")) / name


@functools.cache
def code_version() -> str:
    """The package version plus a hash of kdpipe's source: part of each stage's cache key, so a
    stage computed by other code (an edit, another release) is never reused."""
    return f"{__version__}+{source_digest(Path(__file__).resolve().parent)}"


# `${kdpipe.one_minus:${..alpha}}`: the CE weight of classic KD, 1 - alpha (conf/base/offline.yaml).
OmegaConf.register_new_resolver("kdpipe.one_minus", lambda x: 1.0 - float(x), replace=True)

"""The `kdpipe` command: a `@hydra.main` over `conf/config.yaml`. No logic lives here."""

from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdpipe.errors import ConfigError
from kdpipe.locks import LockError, lock_dir

_SOURCE_CONF = Path(__file__).resolve().parent.parent / "conf"
CONFIG_PATH = str(_SOURCE_CONF) if (_SOURCE_CONF / "config.yaml").is_file() else "pkg://kdpipe.conf"


def _quiet_libraries() -> None:
    """Keep the console for progress bars and the summary: library chatter goes to WARNING, the ONNX
    exporter's to ERROR (its optimiser warns of every constant it could not fold, e.g. for a transformer's
    attention mask, and exports a correct model without the fold)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "mlflow", "alembic",
                 "torch.onnx", "onnx_ir", "onnxscript", "torch._export", "torch.export"):
        quiet = logging.ERROR if name.startswith(("torch", "onnx")) else logging.WARNING
        logging.getLogger(name).setLevel(quiet)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A frozen teacher in eval mode is intended; Lightning warns about it on every fit.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Expected: a resumed stage checkpoints into the folder its interrupted run left.
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    # data.augment runs in the module's on_after_batch_transfer on purpose (teacher and student see one view).
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Compose, validate, run; return `cfg.optimized_metric` for Hydra sweepers."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from kdpipe.config import validate
    from kdpipe.faults import Terminated, mark_killed, on_sigterm, terminated_runs
    from kdpipe.pipeline import run_pipeline

    _quiet_libraries()
    try:
        validate(cfg)
        with on_sigterm():
            metrics = run_pipeline(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, LockError) as exc:
        print(f"kdpipe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (Terminated, SIGTERMException):
        run_ids = terminated_runs()
        mark_killed(run_ids)
        print(f"kdpipe: received SIGTERM: runs {', '.join(run_ids)} marked KILLED; run the same command "
              f"again to reuse the finished stages and resume the interrupted one", file=sys.stderr)
        sys.exit(128 + 15)
    except FloatingPointError as exc:  # the stage run is already marked FAILED
        print(f"kdpipe: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:  # the disk filled up or went read-only mid-run: the runs are marked FAILED
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"kdpipe: error: {exc.strerror}{where}; free space or point hydra.run.dir, checkpoint_dir and "
              f"tracking.uri at a writable file system, then run the same command again", file=sys.stderr)
        sys.exit(1)
    return metrics.get(cfg.get("optimized_metric") or "test/acc")


def entry() -> None:
    """The `kdpipe` command: a misspelled key, a wrongly typed value or a value out of its range
    (each value of a sweep) fails here, in one line naming the key, before torch, Lightning and
    MLflow are imported; so do missing or broken data files, an unwritable output folder or store,
    a teacher checkpoint that is no torch file and a tracking server that does not answer
    (`kdpipe.preflight`), before Hydra creates the run folder. Then Hydra runs `main`."""
    from kdpipe.overrides import check
    from kdpipe.preflight import check_command

    args = sys.argv[1:]
    try:
        configs = check(args, CONFIG_PATH)
        check_command(args, configs)
        lock_dir(create=False)  # a lock folder another user planted fails here, not after the imports
    except (ConfigError, LockError) as exc:
        print(f"kdpipe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
    # The interpreter's last garbage collection walks every object torch, Lightning and MLflow made
    # (about 4 s on 2 cores, scripts/bench_default_run.py); the job is done, so skip it.
    gc.freeze()


if __name__ == "__main__":
    entry()

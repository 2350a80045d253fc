"""The Hydra callback of a multirun: one sweep id for every job, and the sweep report at the end."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdpipe.tracking.naming import SWEEP_ENV

log = logging.getLogger("kdpipe")


class SweepCallback(Callback):
    """`on_multirun_start` runs in the launching process before any job: it fixes the sweep id
    (Hydra's sweep directory) in $KDPIPE_SWEEP, which launcher processes inherit (parallel jobs
    creating one SQLite store are serialised by `setup_tracking` itself).
    `on_multirun_end` writes the sweep report into `<sweep dir>/report` and logs it as a run."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        self._set_env = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not os.environ.get(SWEEP_ENV):
            os.environ[SWEEP_ENV] = str(config.hydra.sweep.dir)
            self._set_env = True

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = os.environ.get(SWEEP_ENV)
        if self._set_env:
            del os.environ[SWEEP_ENV]
        if not self.report:
            return
        from kdpipe.errors import ConfigError
        from kdpipe.report.sweep import build_report

        folder = Path(str(config.hydra.sweep.dir)) / "report"
        try:
            report = build_report(config.tracking.experiment, sweep, folder)
        except ConfigError as exc:  # e.g. every job failed: nothing to report
            log.warning("no sweep report: %s", exc)
            return
        print(f"kdpipe: sweep report in {folder} (run {report.run_id}, {len(report.runs)} pipeline runs); "
              f"rebuild it with: kdpipe-report {config.tracking.experiment} --sweep '{sweep}'")

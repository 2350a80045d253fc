"""How a pipeline run is named and grouped in the MLflow UI.

A sweep is read as a list of runs: the run name says what differs (`kd-T4-a0.9-mag50-int8`),
and the tag `kdpipe.sweep` holds one value for every run of one multirun, so one search
(`tags.kdpipe.sweep = '...'`) shows exactly that sweep.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import DictConfig

SWEEP_TAG = "kdpipe.sweep"
# Set by the Hydra callback at the start of a multirun, so every job (local, joblib, SLURM)
# tags the same value; a user may set it to group several launches into one sweep.
SWEEP_ENV = "KDPIPE_SWEEP"

# Overrides that change how a run is run or logged, not what it computes: never in a name.
_SILENT_PREFIXES = ("eval.", "tracking", "hydra", "experiment", "hparams_search", "run_name", "reuse",
                    "optimized_metric", "trainer.enable_", "trainer.log_every_n_steps", "trainer.accelerator",
                    "trainer.devices", "trainer.deterministic")
# Keys the core of the name already shows.
_SHOWN = ("distill", "prune", "quantize", "seed")
_SHORT = {"max_epochs": "ep", "width": "w", "lr": "lr", "weight_decay": "wd", "teacher": "t-"}


def _num(value: float) -> str:
    return f"{float(value):g}"


def run_name(cfg: DictConfig, overrides: Sequence[str] = ()) -> str:
    """`<scheme>[-T<t>-a<alpha>][-<prune><pct>][-int8[-<mode>]][-s<seed>]` plus the other
    overridden keys (`-mlp`, `-lr0.1`), so runs of one sweep differ by name where they differ."""
    distill = cfg.distill
    parts = [str(distill.get("name", "kd"))]
    if distill.get("terms"):
        if distill.get("temperature") is not None:
            parts.append(f"T{_num(distill.temperature)}")
        if distill.get("alpha") is not None:
            parts.append(f"a{_num(distill.alpha)}")
    method = cfg.prune.get("method", "none")
    if method != "none":
        parts.append(f"{str(method)[:3]}{round(100 * float(cfg.prune.get('sparsity', 0.0)))}")
    mode = cfg.quantize.get("mode", "none")
    if mode != "none":
        parts.append("int8" if mode == "static" else f"int8-{mode}")  # static is the default mode
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "seed" in keys or int(cfg.get("seed", 0)) != 0:
        parts.append(f"s{cfg.seed}")
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key.startswith(_SILENT_PREFIXES) or key.split(".")[0].split("/")[0] in _SHOWN:
            continue
        leaf = key.rsplit(".", 1)[-1]
        if "." not in key:  # a config group choice: `student=mlp` -> `mlp`
            parts.append(f"{_SHORT.get(key, '')}{value}")
        else:  # `optim.lr=0.1` -> `lr0.1`; a teacher key is marked: `teacher.model.width=8` -> `t-w8`
            mark = "t-" if key.startswith("teacher.") else ""
            parts.append(f"{mark}{_SHORT.get(leaf, leaf)}{value}")
    return "-".join(parts)


def sweep_id(multirun: bool, sweep_dir: str | None) -> str | None:
    """The value of the `kdpipe.sweep` tag: $KDPIPE_SWEEP when set (the multirun's callback sets
    it), else Hydra's sweep directory in a multirun, else None (a single run is no sweep)."""
    env = os.environ.get(SWEEP_ENV)
    if env:
        return env
    return str(sweep_dir) if multirun and sweep_dir else None

"""How a pipeline run is named and grouped in the MLflow UI.

A sweep is read as a list of runs: the run name says what differs (`kd-T2-a0.9-mag50-int8`),
and the tag `kdpipe.sweep` holds one value for every run of one multirun, so one search
(`tags.kdpipe.sweep = '...'`) shows exactly that sweep.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import PurePosixPath

from omegaconf import DictConfig, OmegaConf

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
_SHORT = {"max_epochs": "ep", "width": "w", "lr": "lr", "weight_decay": "wd", "teacher": "t-",
          "checkpoint": "ckpt"}
# Hydra's escape of a special character in an override value: `runs\:/...` is `runs:/...`.
_ESCAPED = re.compile(r"\\(.)")


def _num(value: float) -> str:
    return f"{float(value):g}"


def short_ref(value: str) -> str | None:
    """A path or URI as a short, stable word, else None: the first 8 characters of an MLflow run
    id (`runs:/41418de2.../model/model.pt` -> `41418de2`), a registered model's name and version
    (`models:/teacher/3` -> `teacher-3`), else the file stem (`/ckpts/resnet_best.pt` ->
    `resnet_best`)."""
    if not ("/" in value or "://" in value):
        return None
    if value.startswith("runs:/"):
        return value[len("runs:/"):].lstrip("/").split("/")[0][:8]
    if value.startswith("models:/"):
        return "-".join(value[len("models:/"):].strip("/").split("/")[:2])
    return PurePosixPath(value.split("://", 1)[-1].rstrip("/")).stem or value


def scheme_name(distill: DictConfig) -> str:
    """`distill.name` (`kd`), else the scheme's class (`Offline` -> `offline`)."""
    if distill.get("name") is not None:
        return str(distill.name)
    return str(OmegaConf.select(distill, "scheme._target_", default="distill")).rsplit(".", 1)[-1].lower()


def _override_part(key: str, value: str) -> str | None:
    """`student=mlp` -> `mlp`, `optim.lr=0.1` -> `lr0.1`, `teacher.model.width=8` -> `t-w8`,
    `teacher.checkpoint=runs:/<id>/...` -> `t-ckpt-<id[:8]>`; a loss term or scheme key:
    `distill.terms.nckd.weight=4` -> `nckd4`, `+distill.terms.hint={...}` -> `hint`,
    `distill.scheme.peers=3` -> `peers3`; None for a key the name leaves out."""
    path = key.split(".")
    if path[0] == "distill" and len(path) >= 3 and path[1] in ("terms", "scheme"):
        if path[1] == "terms" and len(path) == 3:  # a term added or replaced whole
            return path[2]
        leaf = path[2] if path[1] == "terms" and path[-1] == "weight" else path[-1]
        return leaf if value.startswith(("[", "{")) else f"{leaf}{value}"
    if key.startswith(_SILENT_PREFIXES) or key.split(".")[0].split("/")[0] in _SHOWN:
        return None
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "seed":  # data.seed and the like: the run's seed is shown once, as -s<seed>
        return None
    ref = short_ref(value)
    if "." not in key:  # a config group choice: `student=mlp` -> `mlp`
        return f"{_SHORT.get(key, '')}{ref or value}"
    mark = "t-" if key.startswith("teacher.") else ""
    return f"{mark}{_SHORT.get(leaf, leaf)}{'-' + ref if ref else value}"


def run_name(cfg: DictConfig, overrides: Sequence[str] = ()) -> str:
    """`<scheme>[-T<t>][-a<alpha>][-<prune><pct>][-int8[-<mode>]][-s<seed>]` plus the other
    overridden keys (`-mlp`, `-lr0.1`, `-t-ckpt-41418de2`), so runs of one sweep differ by name
    where they differ."""
    distill = cfg.distill
    parts = [scheme_name(distill)]
    if distill.get("terms"):
        if distill.get("temperature") is not None:
            parts.append(f"T{_num(distill.temperature)}")
        if distill.get("alpha") is not None and OmegaConf.select(distill, "terms.kd.weight", default=0):
            parts.append(f"a{_num(distill.alpha)}")  # only where the KD term is in the sum
    method = cfg.prune.get("method", "none")
    if method != "none":
        parts.append(f"{str(method)[:3]}{round(100 * float(cfg.prune.get('sparsity', 0.0)))}")
    mode = cfg.quantize.get("mode", "none")
    if mode != "none":
        parts.append("int8" if mode == "static" else mode if mode in ("int4", "binary", "kmeans")
                     else f"int8-{mode}")  # static is the default mode
    items = [_ESCAPED.sub(r"\1", o.lstrip("+~")).partition("=") for o in overrides]
    if any(key == "seed" for key, _, _ in items) or int(cfg.get("seed", 0)) != 0:
        parts.append(f"s{cfg.seed}")
    parts += [part for key, _, value in items if (part := _override_part(key, value)) is not None]
    return "-".join(parts)


def sweep_id(multirun: bool, sweep_dir: str | None) -> str | None:
    """The value of the `kdpipe.sweep` tag: $KDPIPE_SWEEP when set (the multirun's callback sets
    it), else Hydra's sweep directory in a multirun, else None (a single run is no sweep)."""
    env = os.environ.get(SWEEP_ENV)
    if env:
        return env
    return str(sweep_dir) if multirun and sweep_dir else None

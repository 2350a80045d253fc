"""Command-line overrides checked against the config they override, before Hydra starts a job.

Hydra's struct mode already refuses a key the config does not have, but its report is a
multi-line traceback hint; and a value of the wrong type (`distill.temperature=hot`) composes
fine and fails deep inside training. This check composes the config once per command with the
first value of every sweep, then turns a refused key into one line naming it (with the closest
existing key), and compares the type of each `key=value` with the default it replaces. It needs
no schema listing every key, so options added to config groups are checked as they appear.
Last, the ranges of `kdpipe.limits` are checked on the composed config, once per value of each
sweep. Nothing here imports torch, Lightning or MLflow: a bad value fails in about a second.
The configs checked are returned (Hydra's own node included), so `kdpipe.preflight` can check
them against the machine (files, folders, the tracking server) without composing them again.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdpipe.errors import ConfigError
from kdpipe.limits import check_config

# Keys whose values legitimately take several types (Lightning: devices=2 or "auto" or [0, 1];
# limit_*_batches=10 batches or 0.1 of them).
MIXED_TYPE_KEYS = {"trainer.devices", "trainer.num_nodes", "trainer.precision", "trainer.strategy",
                   "trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches",
                   "trainer.val_check_interval", "trainer.max_time", "trainer.gradient_clip_val"}

# Flags after which Hydra reads another config than ours: leave those commands to Hydra.
_OWN_CONFIG_FLAGS = ("-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir", "--info", "-i")
# Flags with which Hydra prints something (help, the config, a completion script) and runs no job.
NO_JOB_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--shell-completion", "-sc", "--version",
                "--experimental-rerun")


def runs_a_job(args: Sequence[str]) -> bool:
    """Whether Hydra starts a job (or a sweep) for these command-line arguments."""
    return not any(a.split("=")[0] in (*NO_JOB_FLAGS, *_OWN_CONFIG_FLAGS) for a in args)


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple, ListConfig)):
        return "a list"
    if isinstance(value, (dict, DictConfig)):
        return "a mapping"
    return None


def _compatible(default: Any, value: Any) -> bool:
    want, got = _kind(default), _kind(value)
    if want is None or got is None or want == got:
        return True
    if want == "a number" and got == "an integer":
        return True
    return want == "a string" and got in ("an integer", "a number", "a boolean (true/false)")


def single_value(override: Override) -> str | None:
    """`key=value` with the first value of a sweep (None for what cannot be enumerated: an
    interval or glob that a sweeper samples)."""
    if not override.is_sweep_override():
        return override.input_line
    if not override.is_discrete_sweep() or override.value_type.name == "GLOB_CHOICE_SWEEP":
        return None
    first = next(iter(override.sweep_string_iterator()), None)
    return None if first is None else f"{override.get_key_element()}={first}"


def _one_line(exc: BaseException) -> str:
    parts, seen = [], set()
    while exc is not None:
        text = " ".join(line.strip() for line in str(exc).split("Config search path")[0].splitlines()
                        if line.strip())
        if text and text not in seen and "HYDRA_FULL_ERROR" not in text:
            parts.append(text)
            seen.add(text)
        exc = exc.__cause__
    return "; ".join(parts)


def _unknown_key_message(key: str, value: str, base: DictConfig) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    keys = [k for k in node.keys() if parent or k != "hydra"] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, [str(k) for k in keys], n=1)
    where = f"'{parent}'" if parent else "the root config"
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else \
        f"its keys are {', '.join(map(str, keys[:15]))}"
    return (f"{key}={value}: {where} has no key '{leaf}' ({hint}); "
            f"to add a new key on purpose write +{key}={value}")


def _parse(lines: Sequence[str], hydra: bool = False) -> list[Override]:
    """The overrides of the config (or, with `hydra`, those of Hydra's own node)."""
    try:
        return [o for o in OverridesParser.create().parse_overrides(list(lines))
                if o.is_hydra_override() == hydra]
    except HydraException as exc:
        raise ConfigError(_one_line(exc)) from None


def _split(overrides: list[Override], repo: Any) -> tuple[list[Override], list[Override]]:
    """(config group choices and deletions, value overrides), leaving out what a sweeper samples
    (an interval): that is checked in the job."""
    groups, values = [], []
    for o in overrides:
        if single_value(o) is None:
            continue
        is_group = repo.group_exists(o.key_or_group.replace(".", "/")) or "/" in o.key_or_group
        (groups if is_group or o.is_delete() else values).append(o)
    return groups, values


def _given(override: Override) -> list[Any]:
    return list(override.sweep_iterator()) if override.is_discrete_sweep() else [override.value()]


def _compose_variants(config_name: str, groups: list[Override],
                      hydra_lines: Sequence[str] = ()) -> list[DictConfig]:
    """One config per option of a swept group, the other groups at their first option: a key is
    unknown only if no option has it, and is typed by the first option that has it. Each comes
    with Hydra's node, composed with `hydra_lines` (the command's overrides of Hydra's node, the
    `hydra.searchpath=[...]` that adds a user's own config folders among them)."""
    first = [*hydra_lines, *(single_value(o) for o in groups)]
    variants = [first]
    for i, o in enumerate(groups):
        if o.is_discrete_sweep():
            for option in list(o.sweep_string_iterator())[1:]:
                j = i + len(hydra_lines)
                variants.append([*first[:j], f"{o.get_key_element()}={option}", *first[j + 1:]])
    try:
        return [compose(config_name, overrides=v, return_hydra_config=True) for v in variants]
    except (HydraException, ValueError) as exc:  # ValueError: a group given a number (`optim=3`)
        raise ConfigError(_one_line(exc)) from None


def _has(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING


def _check_key_and_type(override: Override, bases: list[DictConfig]) -> None:
    key = override.key_or_group
    if override.is_add() or override.is_force_add():
        return
    having = [b for b in bases if _has(b, key)]
    if not having:
        raise ConfigError(_unknown_key_message(key, override.input_line.split("=", 1)[1], bases[0]))
    if key in MIXED_TYPE_KEYS:
        return
    default = OmegaConf.select(having[0], key)
    for new in _given(override):
        if isinstance(new, str) and "${" in new:  # an interpolation: typed once resolved
            continue
        if not _compatible(default, new):
            shown = str(default).lower() if isinstance(default, bool) else default
            raise ConfigError(f"{key}={new}: {key} takes {_kind(default)} (default {shown}) but got "
                              f"{_kind(new)} {new!r}; e.g. {key}={shown}")


def _with_value(cfg: DictConfig, override: Override, value: Any) -> DictConfig:
    """A copy of `cfg` with `key=value` applied as Hydra applies a value override."""
    out = copy.deepcopy(cfg)
    try:
        OmegaConf.update(out, override.key_or_group, value, merge=True,
                         force_add=override.is_add() or override.is_force_add())
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{override.input_line}: {_one_line(exc)}") from None
    return out


def _check_ranges(bases: list[DictConfig], values: list[Override]) -> list[DictConfig]:
    """`kdpipe.limits` on each base with every value override at its first value, then with each
    other value of a sweep in turn: a bad value anywhere in a sweep stops the command. A key of
    one option of a swept group only (`prune.importance` of `prune=structured`) is set where it is.
    Returns the configs checked."""
    checked = []
    for base in bases:
        mine = [o for o in values if o.is_add() or o.is_force_add() or _has(base, o.key_or_group)]
        full = base
        for o in mine:
            full = _with_value(full, o, _given(o)[0])
        check_config(full)
        checked.append(full)
        for o in mine:
            for value in _given(o)[1:]:
                other = _with_value(full, o, value)
                check_config(other)
                checked.append(other)
    return checked


def check(args: Sequence[str], config_path: str, config_name: str = "config") -> list[DictConfig]:
    """Raise `ConfigError` (one line, naming the key) on an unknown key, a wrongly typed value or
    a value out of its range (`kdpipe.limits`), for every value of a sweep (on the command line or
    in the `hydra.sweeper.params` of an experiment).

    Returns the configs checked, each with Hydra's node: one per option of a swept group (the other
    groups at their first option) with every value override at its first value, and one more per
    other value of a swept key. Returns [] when nothing was composed: another config than ours
    (`-cp`, `-cn`), a call from inside a Hydra app, or a command that prints (`--help`, `--cfg`)
    and has no overrides to check."""
    if any(a.split("=")[0] in _OWN_CONFIG_FLAGS for a in args):
        return []
    multirun = any(a in ("-m", "--multirun") for a in args)
    lines = [a for a in args if not a.startswith("-") and "=" in a]
    overrides = _parse(lines)
    if (not overrides and not multirun and not runs_a_job(args)) or GlobalHydra.instance().is_initialized():
        return []  # nothing to check, or called from inside a Hydra app
    # Hydra's own overrides (hydra.run.dir=..., hydra/launcher=joblib) shape the job's folders; a
    # sweep of one of them is Hydra's to expand.
    hydra_lines = [o.input_line for o in _parse(lines, hydra=True) if not o.is_sweep_override()]
    init = initialize_config_module(config_path[len("pkg://"):], version_base="1.3") \
        if config_path.startswith("pkg://") else initialize_config_dir(config_path, version_base="1.3")
    with init:
        repo = GlobalHydra.instance().config_loader().repository
        groups, values = _split(overrides, repo)
        bases = _compose_variants(config_name, groups, hydra_lines)
        if multirun:  # the sweep of an experiment file; the command line wins, as in Hydra's sweeper
            given = {o.key_or_group for o in overrides}
            params = OmegaConf.select(bases[0], "hydra.sweeper.params") or {}
            more_groups, more_values = _split([o for o in _parse([f"{k}={v}" for k, v in params.items()])
                                               if o.key_or_group not in given], repo)
            values += more_values
            if more_groups:
                groups += more_groups
                bases = _compose_variants(config_name, groups, hydra_lines)
        for o in values:
            _check_key_and_type(o, bases)
        return _check_ranges(bases, values)


_MISSING = object()

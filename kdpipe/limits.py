"""The allowed range of every numeric knob, checked in one place.

Imports nothing heavy (no torch, Lightning or MLflow), so the command line can reject a bad
value in well under a second, before any long import; the loss terms, schemes and pruners call
the same functions when they are built, so a value given in Python is held to the same rule.
Each function returns the value as a number, or raises `ConfigError` naming the key and the fix;
`check_config` applies them to every key of a composed config that `RANGES` names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from functools import partial
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdpipe.errors import ConfigError


def _number(value: Any, key: str, hint: str) -> float:
    if isinstance(value, bool):  # float(True) is 1.0: a flag is not a number
        raise ConfigError(f"{key}={value} must be a number ({hint})")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value} must be a number ({hint})") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}={value} must be a finite number ({hint})")
    return number


def temperature(value: Any, key: str = "distill.temperature") -> float:
    """A softmax temperature: finite and > 0 (Hinton et al. 2015 use 1-20)."""
    return positive(value, key, "try 1-16; 4 is a common default")


def unit_interval(value: Any, key: str, what: str) -> float:
    """A mixing weight in [0, 1], e.g. `distill.alpha`, the weight of the soft term against CE."""
    a = _number(value, key, f"the weight of {what}, in [0, 1]")
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"{key}={value} must lie in [0, 1] (the weight of {what})")
    return a


def alpha(value: Any, key: str = "distill.alpha") -> float:
    return unit_interval(value, key, "the KD term against CE")


def weight(value: Any, key: str) -> float:
    """A loss weight: finite and >= 0 (0 removes the term)."""
    return non_negative(value, key, "a loss weight; 0 removes the term")


def fraction(value: Any, key: str, what: str = "the share of the samples held out") -> float:
    """A share strictly inside (0, 1): `data.val_fraction`, `data.test_fraction`."""
    f = _number(value, key, f"{what}, in (0, 1), e.g. 0.1")
    if not 0.0 < f < 1.0:
        raise ConfigError(f"{key}={value} must lie in (0, 1) ({what}, e.g. 0.1)")
    return f


def labeled_fraction(value: Any, key: str = "data.labeled_fraction") -> float:
    """The share of the training images whose labels training sees: in (0, 1]."""
    f = _number(value, key, "the share of training labels kept, in (0, 1]; 1 keeps all")
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"{key}={value} must lie in (0, 1]: the share of training images whose labels "
                          f"are used (e.g. 0.1); 1 keeps all")
    return f


def split_fractions(val: Any, test: Any, prefix: str = "data.") -> None:
    """Validation and test shares that leave a training split: each in (0, 1), their sum < 1."""
    v = fraction(val, f"{prefix}val_fraction", "the share of the samples held out for validation")
    t = fraction(test, f"{prefix}test_fraction", "the share of the samples held out for testing")
    if v + t >= 1.0:
        raise ConfigError(f"{prefix}val_fraction={val} + {prefix}test_fraction={test} = {v + t:g} leaves no "
                          f"training split; keep the sum below 1, e.g. {prefix}val_fraction=0.1 "
                          f"{prefix}test_fraction=0.2")


def num_classes(value: Any, key: str = "data.num_classes") -> int:
    """Classes of a classification task: at least two."""
    return whole_number(value, key, "classification needs at least two classes", minimum=2)


def name(value: Any, key: str) -> str:
    """A name that is not empty or blank (an MLflow experiment)."""
    if value is None or not str(value).strip():
        raise ConfigError(f"{key}={'null' if value is None else repr(value)} is empty; give a name, "
                          f"e.g. {key}=kdpipe")
    return str(value)


def sparsity(value: Any, key: str = "prune.sparsity") -> float:
    """A fraction of weights or channels removed: in [0, 1)."""
    s = _number(value, key, "the fraction removed, in [0, 1)")
    if not 0.0 <= s < 1.0:
        raise ConfigError(f"{key}={value} must lie in [0, 1) (the fraction of weights removed)")
    return s


def positive(value: Any, key: str, hint: str) -> float:
    """A finite number > 0 (a temperature, a learning rate, a scale)."""
    x = _number(value, key, hint)
    if x <= 0:
        raise ConfigError(f"{key}={value} must be > 0 ({hint})")
    return x


def non_negative(value: Any, key: str, hint: str) -> float:
    """A finite number >= 0 (a loss weight, a weight decay, an epoch to start at)."""
    x = _number(value, key, hint)
    if x < 0:
        raise ConfigError(f"{key}={value} must be >= 0 ({hint})")
    return x


def whole_number(value: Any, key: str, hint: str, minimum: int = 0) -> int:
    """A count >= `minimum` (0 fine-tuning epochs means none)."""
    n = _number(value, key, hint)
    if n != int(n):
        raise ConfigError(f"{key}={value} must be a whole number ({hint})")
    if n < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum} ({hint})")
    return int(n)


def positive_int(value: Any, key: str, hint: str) -> int:
    """A count >= 1 (epochs, steps, peers, generations)."""
    return whole_number(value, key, hint, minimum=1)


# The range of each key of a composed config, by key pattern (fnmatch: `*` spans dots); the first
# pattern that matches a key decides, and a key a config does not have is not checked. The
# `distill.*` patterns hold for the flat scheme files and for the layout with
# `distill.terms.<name>.{weight,temperature,...}` and `distill.scheme.{...}` alike.
RANGES: dict[str, Callable[[Any, str], Any]] = {
    "distill.temperature": temperature,
    "distill.*.temperature": temperature,
    "distill.alpha": alpha,
    "distill.*weight": weight,  # distill.terms.<name>.weight, distill.hint_weight, ...
    "distill.scheme.peers": partial(whole_number, hint="mutual learning needs a cohort", minimum=2),
    "distill.*generations": partial(positive_int, hint="born-again generations, e.g. 2"),
    "*max_epochs": partial(positive_int, hint="training epochs"),
    "prune.sparsity": sparsity,
    "prune.schedule.initial_sparsity": sparsity,
    "prune.schedule.steps": partial(positive_int, hint="prune/fine-tune steps, e.g. 5"),
    "prune.schedule.frequency": partial(positive_int, hint="optimizer steps between pruning steps"),
    "prune.schedule.*_epoch": partial(non_negative, hint="in fine-tuning epochs"),  # agp's start and end
    "prune.finetune.epochs": partial(whole_number, hint="fine-tuning epochs; 0 for none"),
    "*lr_scale": partial(positive, hint="fine-tuning lr = optim.lr * this"),  # prune.finetune, quantize
    "quantize.calibration.num_batches": partial(
        positive_int, hint="static int8 needs calibration data to set activation ranges, e.g. 8 batches"),
    "quantize.epochs": partial(whole_number, hint="fine-tuning epochs of qat, int4, binary, kmeans"),
    "optim.lr": partial(positive, hint="the learning rate, e.g. 0.01"),
    "optim.weight_decay": partial(non_negative, hint="the L2 penalty; 0 for none"),
    "data.batch_size": partial(positive_int, hint="samples per batch"),
    "data.num_classes": num_classes,
    "data.val_fraction": partial(fraction, what="the share of the samples held out for validation"),
    "data.test_fraction": partial(fraction, what="the share of the samples held out for testing"),
    "data.labeled_fraction": labeled_fraction,
    "tracking.experiment": name,
    "eval.latency_iters": partial(positive_int, hint="timed runs per model"),
    "eval.latency_warmup": partial(whole_number, hint="untimed runs before timing"),
    "eval.throughput_batch_size": partial(positive_int, hint="samples per timed batch"),
    "exits.max_acc_drop": partial(non_negative, hint="points of validation accuracy the exits may cost"),
    "exits.head_width": partial(positive_int, hint="channels of each exit head, or null for its block's"),
    "exits.loss.temperature": temperature,
    "exits.loss.*": weight,
    "exits.latency_samples": partial(positive_int, hint="test images timed one at a time"),
}


def _leaves(node: DictConfig, prefix: str = "",
            skip: tuple[str, ...] = ()) -> Iterator[tuple[str, Any, bool]]:
    """(dotted key, resolved value, is an interpolation) of every leaf of the mappings under
    `node` but its keys in `skip`; a value that cannot be resolved yet (a resolver of the running
    job) is left out."""
    for key in node.keys():
        if key in skip:
            continue
        full = f"{prefix}{key}"
        try:
            value = node[key]
        except OmegaConfBaseException:
            continue
        if isinstance(value, DictConfig):
            yield from _leaves(value, f"{full}.")
        elif value is not None and not OmegaConf.is_list(value):
            yield full, value, OmegaConf.is_interpolation(node, str(key))


def _agp_bounds(cfg: DictConfig) -> None:
    """Automated gradual pruning (Zhu & Gupta 2017) ramps from `initial_sparsity` to
    `prune.sparsity` between `start_epoch` and `end_epoch` of the fine-tuning."""
    prune = cfg.get("prune")
    sched = prune.get("schedule") if isinstance(prune, DictConfig) else None
    if (not isinstance(sched, DictConfig)
            or "agp" not in str(sched.get("name") or sched.get("_target_")).lower()):
        return
    if "initial_sparsity" in sched and "sparsity" in prune and sched.initial_sparsity > prune.sparsity:
        raise ConfigError(f"prune.schedule.initial_sparsity={sched.initial_sparsity} must lie in "
                          f"[0, prune.sparsity={prune.sparsity}]")
    epochs = prune.get("finetune", {}).get("epochs")
    start, end = sched.get("start_epoch"), sched.get("end_epoch")
    if start is not None and end is not None and (end <= start or (epochs is not None and end > epochs)):
        raise ConfigError(f"prune.schedule: agp needs start_epoch < end_epoch <= prune.finetune.epochs "
                          f"(got {start}, {end}, {epochs})")


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` on the first key of `cfg` outside its range in `RANGES`. Values written
    in place are checked before interpolations (`distill.terms.kd.temperature: ${...temperature}`),
    so the message names the key the user set."""
    leaves = list(_leaves(cfg, skip=("hydra",)))  # a config composed with Hydra's own node
    for key, value, _ in sorted(leaves, key=lambda leaf: leaf[2]):
        check = next((f for pattern, f in RANGES.items() if fnmatchcase(key, pattern)), None)
        if check is not None:
            check(value, key)
    _agp_bounds(cfg)
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "val_fraction" in data and "test_fraction" in data:
        try:
            val, test = data.val_fraction, data.test_fraction
        except OmegaConfBaseException:  # resolved by the running job: checked by the data module
            return
        split_fractions(val, test)

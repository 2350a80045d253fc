"""The allowed range of every numeric knob, checked in one place.

Imports nothing heavy (no torch, Lightning or MLflow), so the command line can reject a bad
value in well under a second, before any long import; the loss terms, schemes and pruners call
the same functions when they are built, so a value given in Python is held to the same rule.
Each function returns the value as a float, or raises `ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import math
from typing import Any

from kdpipe.errors import ConfigError


def _number(value: Any, key: str, hint: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value} must be a number ({hint})") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}={value} must be a finite number ({hint})")
    return number


def temperature(value: Any, key: str = "distill.temperature") -> float:
    """A softmax temperature: finite and > 0 (Hinton et al. 2015 use 1-20)."""
    hint = "try 1-16; 4 is a common default"
    t = _number(value, key, hint)
    if t <= 0:
        raise ConfigError(f"{key}={value} must be > 0 ({hint})")
    return t


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
    w = _number(value, key, "a loss weight >= 0; 0 removes the term")
    if w < 0:
        raise ConfigError(f"{key}={value} must be >= 0 (a loss weight; 0 removes the term)")
    return w


def sparsity(value: Any, key: str = "prune.sparsity") -> float:
    """A fraction of weights or channels removed: in [0, 1)."""
    s = _number(value, key, "the fraction removed, in [0, 1)")
    if not 0.0 <= s < 1.0:
        raise ConfigError(f"{key}={value} must lie in [0, 1) (the fraction of weights removed)")
    return s


def positive_int(value: Any, key: str, hint: str) -> int:
    """A count >= 1 (epochs, steps, peers, generations)."""
    n = _number(value, key, hint)
    if n != int(n) or n < 1:
        raise ConfigError(f"{key}={value} must be a whole number >= 1 ({hint})")
    return int(n)


def non_negative(value: Any, key: str, hint: str) -> float:
    """A finite number >= 0 (a point in a schedule, in epochs)."""
    n = _number(value, key, hint)
    if n < 0:
        raise ConfigError(f"{key}={value} must be >= 0 ({hint})")
    return n


def count(value: Any, key: str, hint: str) -> int:
    """A whole number >= 0 (epochs where 0 means none)."""
    n = non_negative(value, key, hint)
    if n != int(n):
        raise ConfigError(f"{key}={value} must be a whole number >= 0 ({hint})")
    return int(n)

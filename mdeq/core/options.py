"""Declared settings: an ``Option`` is a default, a check and a line of documentation.

The solvers (``mdeq.core.solvers``) and the DEQ layer (``mdeq.core.deq``) declare every setting they take as
an ``Option``; each one is validated by its own check, once, where it enters (``DEQ.configure``, or a direct
solver call), and its default lives in that declaration only. A check is ``check(name, value)`` and raises a
``ValueError`` that says what was wrong and what is expected.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "Option", "Check", "validate", "positive_int", "nonnegative_int", "nonnegative", "positive", "unit_interval",
    "above_one", "flag", "one_of", "optional", "mapping", "record_spec",
]

Check = Callable[[str, Any], None]


@dataclass(frozen=True)
class Option:
    """A setting: its default, the check of its values, and what it means."""

    default: Any
    check: Check
    doc: str = ""


def validate(options: Mapping[str, Any], declared: Mapping[str, Option], what: str) -> None:
    """Check every value of ``options`` against ``declared``; an unknown name is an error naming the valid ones."""
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options are {sorted(declared)}")
    for name, value in options.items():
        declared[name].check(name, value)


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def nonnegative_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {v!r}")


def nonnegative(name: str, v: Any) -> None:
    if not _real(v) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def positive(name: str, v: Any) -> None:
    if not _real(v) or not 0 < v < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def unit_interval(name: str, v: Any) -> None:
    if not _real(v) or not 0 < v <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")


def above_one(name: str, v: Any) -> None:
    if not _real(v) or not v > 1:
        raise ValueError(f"{name} must be a number > 1, got {v!r}")


def flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")


def one_of(*choices: Any) -> Check:
    """A check accepting exactly ``choices``."""

    def check(name: str, v: Any) -> None:
        if isinstance(v, (list, dict)) or v not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {v!r}")

    return check


def optional(check: Check) -> Check:
    """``check``, or None."""

    def check_or_none(name: str, v: Any) -> None:
        if v is not None:
            check(name, v)

    return check_or_none


def mapping(name: str, v: Any) -> None:
    if v is not None and not isinstance(v, Mapping):
        raise ValueError(f"{name} must be a dict of options or None, got {v!r}")


def record_spec(name: str, v: Any) -> None:
    """None, ``"all"`` or a list of iterate indices >= 0 (0 = z0)."""
    if v is None or v == "all":
        return
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in v):
        raise ValueError(f"{name} must be None, 'all' or a list of iterate indices >= 0 (0 = z0), got {v!r}")

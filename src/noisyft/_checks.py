"""Value checks shared by every settings dataclass (train, eval, each method's config). Torch-free.

Every numeric setting goes through one of these in its dataclass's ``__post_init__``, so the CLI, YAML files and
the Python configs reject the same values with the same one-line message (``ValueError``)::

    check_number("NEFTune alpha", self.alpha, low=0)             # finite, >= 0 (nan / inf rejected)
    check_number("Mixout p", self.p, low=0, high=1, high_open=True)  # in [0, 1)
    check_int("fisher num_samples", self.num_samples, low=1)
    check_choice("NEFTune scale", self.scale, ("sequence", "padded"))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _range_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "finite"


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number (not a bool) within the given bounds."""
    if value is None and optional:
        return
    want = _range_text(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {want}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {want}, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, optional: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) within ``[low, high]``."""
    if value is None and optional:
        return
    want = _range_text(low, high, False, False)
    suffix = " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer {want}{suffix}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {want}{suffix}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_regex(name: str, value: str | None) -> None:
    """A pattern setting (include / exclude / layer patterns) must compile."""
    if value is None:
        return
    import re

    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{name} is not a valid regular expression ({exc}): {value!r}") from None

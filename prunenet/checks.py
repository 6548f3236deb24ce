"""The one check for a float hyperparameter (ours): a finite number in its interval, or a one-line error.

Comparisons alone let NaN and infinities through (``nan <= 0`` and ``inf <= 0`` are both False), so
a learning rate of ``.inf`` once trained a "recovered" model of NaN weights. Every float setting of
``fit``, ``compress``, ``recover`` and ``evaluate`` goes through :func:`check_float`.
"""

from __future__ import annotations

import math
from typing import Any

from prunenet.errors import ConfigurationError


def check_float(value: Any, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, if it is a finite number in the interval from ``low`` to ``high``.

    Args:
        value: what the user gave (a bool is not a number here).
        name: the option as the user spells it (``model.learning_rate``), for the message.
        low, high: the bounds (None: unbounded on that side).
        low_open, high_open: exclude the bound itself (``learning_rate > 0``: ``low=0, low_open=True``).
    Returns:
        ``float(value)``.
    Raises:
        ConfigurationError: ``"<name> must be a finite number <interval>, got <value>"``.
    """
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    inside = math.isfinite(number)
    if inside and low is not None:
        inside = number > low if low_open else number >= low
    if inside and high is not None:
        inside = number < high if high_open else number <= high
    if not inside:
        raise ConfigurationError(f"{name} must be a finite number {_interval(low, high, low_open, high_open)}, "
                                 f"got {value!r}")
    return number


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""

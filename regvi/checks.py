"""Type checks for user options: a value of the wrong type is refused with the option named.

A YAML or command-line ``"False"`` is a non-empty string, which Python takes as true; a model
option must never be read that way. These checks run before any data is read or written.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a bool (numpy bools accepted); returns it as ``bool``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name}={_describe(value)}; expected True or False")


def check_int(
    name: str, value: Any, minimum: int | None = None, allow_none: bool = False
) -> int | None:
    """``value`` must be an integer (not a bool, not a float) ``>= minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an integer" + (" or None" if allow_none else "")
        raise TypeError(f"{name}={_describe(value)}; expected {kind}")
    if minimum is not None and value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        raise ValueError(f"{name}={value!r}; expected {kind}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    below_maximum: bool = False,
) -> float:
    """``value`` must be a real number (int or float, not a bool or string) in range.

    ``positive``: ``> 0``; ``minimum`` / ``maximum``: inclusive bounds, ``below_maximum``
    makes the maximum exclusive.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={_describe(value)}; expected a number")
    v = float(value)
    if v != v:
        raise ValueError(f"{name}=nan; expected a number")
    if positive and not v > 0:
        raise ValueError(f"{name}={value!r}; expected a positive number")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}={value!r}; expected a number >= {minimum}")
    if maximum is not None and (v >= maximum if below_maximum else v > maximum):
        bound = "<" if below_maximum else "<="
        raise ValueError(f"{name}={value!r}; expected a number {bound} {maximum}")
    return v


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` must be one of ``choices``."""
    choices = list(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name}={_describe(value)}; expected one of {choices}")
    return value


def check_str(name: str, value: Any) -> str:
    """``value`` must be a string."""
    if not isinstance(value, str):
        raise TypeError(f"{name}={_describe(value)}; expected a string")
    return value

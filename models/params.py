"""Reading hyperparameters from a plain dict, with errors a user can act on."""

from __future__ import annotations

import math
from typing import Any


class ParamError(ValueError):
    """A bad hyperparameter value or name; str(e) is one line for the user."""


def get_int(params: dict[str, Any], name: str, low: int, high: int | None = None) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
        raise ParamError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ParamError(f"{name} must be {bound}, got {value}")
    return value


def get_float(params: dict[str, Any], name: str, low: float, high: float, *, high_open: bool = False) -> float:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (low <= value <= high) or (high_open and value == high):
        interval = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ParamError(f"{name} must be in {interval}, got {value}")
    return value


def get_choice(params: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = params[name]
    if value not in choices:
        raise ParamError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def get_bool(params: dict[str, Any], name: str) -> bool:
    value = params[name]
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise ParamError(f"{name} must be true or false, got {value!r}")

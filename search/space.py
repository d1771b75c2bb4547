"""Search-space dimensions: each hyperparameter declared once, with its range, default, valid limits and condition.

Everything about a parameter derives from its `Dim`: what a trial samples (`suggest`), what a hand-set run
defaults to, which values a user may fix or narrow it to, and whether a setting reads it at all (`when`).
Users fix, narrow or restrict dimensions from the command line or a TOML file (`customize`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from search.errors import UserError

Condition = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Dim:
    """One hyperparameter: a float or int range (log-scaled or not), or a list of choices.

    `limits` bound what a user may fix or narrow a numeric dimension to (what the code can run), beyond the
    range searched by default; a dimension of named choices accepts only its own names. `when` reads the
    values sampled before it: a 4th layer's width exists only in a net of 4 or more layers.
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None
    default: Any = None
    limits: tuple[float, float] | None = None
    allowed: tuple[str, ...] | None = None  # named choices: every valid name, searched or not
    when: Condition | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.default is None:
            object.__setattr__(self, "default", self.choices[0] if self.choices else self.low)
        if self.allowed is None and self.named:
            object.__setattr__(self, "allowed", self.choices)

    @property
    def named(self) -> bool:
        """Choices that are names (optimizer, loss): only the allowed names are valid, in any customization."""
        return self.choices is not None and all(isinstance(c, str) for c in self.choices)

    @property
    def boolean(self) -> bool:
        return self.choices is not None and all(isinstance(c, bool) for c in self.choices)

    def active(self, params: dict[str, Any]) -> bool:
        return self.when is None or bool(self.when(params))

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial samples."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether `value` lies in the searched range or choices."""
        if self.choices is not None:
            return value in self.choices
        return _is_number(value) and self.low <= value <= self.high

    def check(self, value: Any) -> None:
        """Raise a UserError unless `value` is a value this parameter can run with (not only one searched)."""
        if self.named:
            if value not in self.allowed:
                raise UserError(f"{self.name} must be one of {', '.join(self.allowed)}; got {value!r}")
            return
        if self.boolean:
            if not isinstance(value, bool):
                raise UserError(f"{self.name} must be true or false, got {value!r}")
            return
        if not _is_number(value) or not math.isfinite(value):
            raise UserError(f"{self.name} must be a number, got {value!r}")
        if self.integer and int(value) != value:
            raise UserError(f"{self.name} must be an integer, got {value!r}")
        low, high = self.limits if self.limits is not None else (-math.inf, math.inf)
        if not low <= value <= high:
            raise UserError(f"{self.name} must be between {low:g} and {high:g}, got {value:g}")

    def describe(self) -> str:
        if self.choices is not None:
            return str(self.choices[0]) if len(self.choices) == 1 else "{" + ", ".join(map(str, self.choices)) + "}"
        if self.low == self.high:
            return f"{self.low:g}"
        return f"{self.low:g}..{self.high:g}" + (" (log)" if self.log else "")


def real(name: str, low: float, high: float, *, log: bool = False, default: float | None = None,
         limits: tuple[float, float] | None = None, when: Condition | None = None, help: str = "") -> Dim:
    return Dim(name, low, high, log=log, default=default, limits=limits or (low, high), when=when, help=help)


def integer(name: str, low: int, high: int, *, log: bool = False, default: int | None = None,
            limits: tuple[int, int] | None = None, when: Condition | None = None, help: str = "") -> Dim:
    return Dim(name, low, high, log=log, integer=True, default=default, limits=limits or (low, high), when=when,
               help=help)


def choice(name: str, *choices: Any, default: Any = None, limits: tuple[float, float] | None = None,
           allowed: tuple[str, ...] | None = None, when: Condition | None = None, help: str = "") -> Dim:
    """Named or numeric choices. Numeric ones may be replaced by any value within `limits`; named ones by any
    name in `allowed` (default: the choices), e.g. a valid setting that is not worth searching."""
    integral = all(isinstance(c, int) and not isinstance(c, bool) for c in choices)
    return Dim(name, choices=tuple(choices), integer=integral, default=default, limits=limits, allowed=allowed,
               when=when, help=help)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def suggest(trial: Any, dims: list[Dim]) -> dict[str, Any]:
    """Sample one configuration, top to bottom; an inactive dimension (a 4th layer in a 3-layer net) is skipped."""
    params: dict[str, Any] = {}
    for dim in dims:
        if dim.active(params):
            params[dim.name] = dim.suggest(trial)
    return params


def relevant(dims: list[Dim], params: dict[str, Any]) -> dict[str, Any]:
    """`params` without what this setting does not read: momentum under Adam, a 5th width in a 3-layer net.

    Stored and reported params then say only what shaped the run. Keys that are no dimension are kept.
    """
    inactive = {d.name for d in dims if d.name in params and not d.active(params)}
    return {k: v for k, v in params.items() if k not in inactive}


def parse_value(text: str) -> Any:
    """A command-line value: int, float, true/false, or a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def customize(where: str, dims: list[Dim], overrides: dict[str, Any]) -> list[Dim]:
    """Fix (a scalar), narrow (a {low, high[, log]} table or "low..high") or restrict (a list) dimensions."""
    by_name = {d.name: d for d in dims}
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        raise UserError(f"unknown parameter {', '.join(unknown)} in the {where} space; "
                        f"its parameters: {', '.join(by_name)}")
    for name, spec in overrides.items():
        by_name[name] = _customized(f"{where}.{name}", by_name[name], spec)
    return [by_name[d.name] for d in dims]


def _customized(where: str, dim: Dim, spec: Any) -> Dim:
    if isinstance(spec, str) and ".." in spec:
        low, high = (parse_value(part) for part in spec.split("..", 1))
        spec = {"low": low, "high": high}
    if isinstance(spec, dict):
        if dim.choices is not None:
            raise UserError(f"{where} is a choice among {dim.describe()}; give a list or one value, not a range")
        if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise UserError(f"{where}: a range is {{low = ..., high = ...[, log = true]}}, got {spec}")
        low, high = spec["low"], spec["high"]
        if not all(_is_number(v) for v in (low, high)):
            raise UserError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
        if low > high:
            raise UserError(f"{where}: empty range, low {low} > high {high}")
        log = bool(spec.get("log", dim.log))
        if log and low <= 0:
            raise UserError(f"{where}: a log range needs low > 0, got {low}")
        _check_all(where, dim, [low, high])
        return replace(dim, low=low, high=high, log=log, default=low)
    values = spec if isinstance(spec, list) else [spec]
    if not values:
        raise UserError(f"{where}: empty list of choices")
    _check_all(where, dim, values)
    if isinstance(spec, list) or dim.choices is not None:
        return replace(dim, choices=tuple(values), low=None, high=None, log=False, default=values[0])
    return replace(dim, low=spec, high=spec, log=False, default=spec)


def _check_all(where: str, dim: Dim, values: list[Any]) -> None:
    """Every value must be one the code runs with: named choices by name, numbers within the limits."""
    if dim.named:
        unknown = [v for v in values if v not in dim.allowed]
        if unknown:
            raise UserError(f"{where}: unknown value {', '.join(map(repr, unknown))}; "
                            f"choose from {', '.join(dim.allowed)}")
        return
    for value in values:
        if dim.choices is None and not dim.boolean and not _is_number(value):
            raise UserError(f"{where} is numeric ({dim.describe()}); got {value!r}")
        try:
            dim.check(value)
        except UserError as error:
            raise UserError(f"{where}: {str(error).removeprefix(dim.name + ' ')}") from None


def load_space_file(path: Path | str, models: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A TOML file with one table per model family, e.g. [cnn] lr = {low = 1e-4, high = 1e-2}; epochs = 10.

    `models`: the known family names; a table of any other name is a UserError.
    """
    path, known = Path(path), list(models)
    if path.is_dir():
        raise UserError(f"space file {path} is a folder; pass a TOML file, e.g. --space my_space.toml")
    try:
        content = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"space file {path} does not exist") from None
    except OSError as error:  # no permission, a device that cannot be read
        raise UserError(f"cannot read space file {path} ({error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"space file {path} is not valid TOML: {error}") from None
    for family, table in content.items():
        if family not in known:
            raise UserError(f"space file {path}: unknown model {family!r}; choose from {', '.join(known)}")
        if not isinstance(table, dict):
            raise UserError(f"space file {path}: [{family}] must be a table of parameters")
    return content

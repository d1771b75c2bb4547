"""One search space per model family: every value the study tried by hand, as ranges where that fits.

A space is a list of dimensions, read top to bottom like an Optuna objective. Users fix or narrow any
dimension from the command line or a TOML file; the study's hand-found settings can be enqueued first.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import optuna

from models import FAMILIES, get_family
from models.linear import MAX_MLP_LAYERS
from search.errors import UserError
from models.cnn import POOL_TYPES
from models.mobilenet import HEAD_INPUTS
from search.training import LOSSES, OPTIMIZERS, TRAINING_DEFAULTS


@dataclass(frozen=True)
class Dim:
    """One hyperparameter: a float or int range (log-scaled or not) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None
    active: Callable[[dict[str, Any]], bool] | None = None  # depends on values sampled before it

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.choices is not None:
            return self.choices[0] if len(self.choices) == 1 else "{" + ", ".join(map(str, self.choices)) + "}"
        if self.low == self.high:
            return f"{self.low:g}"
        return f"{self.low:g}..{self.high:g}" + (" (log)" if self.log else "")


# Parameters whose values are names: a fixed or restricted value must be one of these.
NAMED_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS,
    "loss": LOSSES,
    "pool_type": POOL_TYPES,
    "head_input": HEAD_INPUTS,
}


def _float(name: str, low: float, high: float, log: bool = False, active=None) -> Dim:
    return Dim(name, low, high, log=log, active=active)


def _int(name: str, low: int, high: int, log: bool = False, active=None) -> Dim:
    return Dim(name, low, high, log=log, integer=True, active=active)


def _choice(name: str, *choices: Any, active=None) -> Dim:
    return Dim(name, choices=tuple(choices), active=active)


def _training(lr: tuple[float, float], decay: tuple[float, float], batch: tuple[int, ...], epochs: int) -> list[Dim]:
    return [
        _choice("optimizer", *OPTIMIZERS),
        _float("lr", *lr, log=True),
        _float("momentum", 0.5, 0.99, active=lambda p: p["optimizer"] in ("sgd", "rmsprop")),
        _float("weight_decay", *decay, log=True),
        _choice("batch_size", *batch),
        _choice("loss", "cross_entropy", "nll", "label_smoothing"),
        _float("label_smoothing", 0.01, 0.2, active=lambda p: p["loss"] == "label_smoothing"),
        _int("epochs", epochs, epochs),  # a budget: pruning decides how much of it a trial gets
        _float("flip_p", 0.0, 0.5),
        _float("max_rotation", 0.0, 15.0),
    ]


def _head(fc1: tuple[int, int], fc2: tuple[int, int]) -> list[Dim]:
    return [_int("fc1", *fc1, log=True), _int("fc2", *fc2, log=True), _float("dropout", 0.0, 0.5),
            _choice("head_input", "features")]


SPACES: dict[str, list[Dim]] = {
    "logreg": _training((1e-5, 3e-2), (1e-6, 1e-2), (32, 64, 128, 256, 512), 60),
    "mlp": [
        _int("n_layers", 3, MAX_MLP_LAYERS),
        *[_int(f"width_{i}", 64, 4096, log=True, active=lambda p, i=i: p["n_layers"] >= i) for i in range(1, MAX_MLP_LAYERS + 1)],
        *[_float(f"dropout_{i}", 0.0, 0.5, active=lambda p, i=i: p["n_layers"] >= i) for i in range(1, MAX_MLP_LAYERS + 1)],
        _choice("batch_norm", True, False),
        *_training((1e-4, 1e-2), (1e-5, 1e-2), (128, 256, 512, 1024), 50),
    ],
    "cnn": [
        _int("n_conv", 2, 4),
        *[_int(f"channels_{i}", 6, 160, log=True, active=lambda p, i=i: p["n_conv"] >= i) for i in range(1, 5)],
        *[_choice(f"pool_{i}", 2, 4, 8, active=lambda p, i=i: p["n_conv"] >= i) for i in range(1, 5)],
        _choice("pool_type", "max", "avg"),
        _choice("kernel_size", 3, 5),
        _int("fc1", 64, 512, log=True),
        _int("fc2", 32, 256, log=True),
        _float("dropout", 0.0, 0.5),
        *_training((1e-4, 1e-2), (1e-5, 3e-2), (16, 32, 64, 128, 256, 512), 60),
    ],
    "mobilenet_frozen": [
        *_head((64, 1024), (16, 256)),
        _choice("feature_views", 1, 2, 4, 8),
        *_training((1e-4, 1e-2), (1e-6, 1e-2), (32, 64, 128, 256, 512), 50),
    ],
    "mobilenet_finetune": [
        *_head((64, 512), (16, 256)),
        _float("backbone_lr_factor", 0.01, 1.0, log=True),
        *_training((1e-4, 5e-3), (1e-6, 1e-3), (32, 64, 128, 256, 512, 1024), 50),
    ],
}

# The study's hand-found best setting of each model (SPEC.md), where the study gave it; the rest are
# values inside the ranges it explored.
REFERENCE_PARAMS: dict[str, dict[str, Any]] = {
    "logreg": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 5e-4, "batch_size": 64, "epochs": 40},
    "mlp": {**FAMILIES["mlp"].defaults, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 512,
            "epochs": 40},
    "cnn": {**FAMILIES["cnn"].defaults, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 64,
            "epochs": 40},
    "mobilenet_frozen": {**FAMILIES["mobilenet_frozen"].defaults, "feature_views": 4, "optimizer": "adam",
                         "lr": 1e-3, "weight_decay": 5e-4, "batch_size": 128, "epochs": 30},
    "mobilenet_finetune": {**FAMILIES["mobilenet_finetune"].defaults, "optimizer": "adam", "lr": 5e-4,
                           "weight_decay": 1e-4, "batch_size": 64, "epochs": 20},
}
for _family, _params in REFERENCE_PARAMS.items():
    _params.update({k: v for k, v in TRAINING_DEFAULTS.items() if k not in _params})
    _params["flip_p"], _params["max_rotation"] = 0.5, 8.0  # the study's augmentation


def known_params(family: str) -> set[str]:
    return set(get_family(family).param_names) | set(TRAINING_DEFAULTS)


def resolve_params(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The study's reference params of `family` with `overrides` on top; an unknown name is a UserError."""
    unknown = sorted(set(overrides) - known_params(family))
    if unknown:
        raise UserError(f"unknown parameter {', '.join(unknown)} for model {family}; "
                        f"known: {', '.join(sorted(known_params(family)))}")
    return relevant_params(family, {**get_family(family).defaults, **REFERENCE_PARAMS[family], **overrides})


def relevant_params(family: str, params: dict[str, Any]) -> dict[str, Any]:
    """Drop what this setting does not read (momentum under Adam, a 5th width in a 3-layer net), so that
    stored and reported params say only what shaped the run."""
    unused = set()
    if params.get("optimizer") not in ("sgd", "rmsprop"):
        unused.add("momentum")
    if params.get("loss") != "label_smoothing":
        unused.add("label_smoothing")
    if family != "mobilenet_frozen":
        unused.add("feature_views")
    for count_key, keys in (("n_layers", ("width", "dropout")), ("n_conv", ("channels", "pool"))):
        if isinstance(params.get(count_key), int):
            unused |= {k for k in params if k.split("_")[0] in keys and k.split("_")[-1].isdigit()
                       and int(k.split("_")[-1]) > params[count_key]}
    return {k: v for k, v in params.items() if k not in unused}


def suggest(trial: optuna.Trial, dims: list[Dim]) -> dict[str, Any]:
    """Sample one configuration; inactive dimensions (a 4th layer's width in a 3-layer net) are skipped."""
    params: dict[str, Any] = {}
    for dim in dims:
        if dim.active is None or dim.active(params):
            params[dim.name] = dim.suggest(trial)
    return params


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


def customize(family: str, dims: list[Dim], overrides: dict[str, Any]) -> list[Dim]:
    """Fix (a scalar), narrow (a {low, high[, log]} table or "low..high") or restrict (a list) dimensions."""
    by_name = {d.name: d for d in dims}
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        raise UserError(f"unknown parameter {', '.join(unknown)} in the {family} space; "
                        f"its parameters: {', '.join(by_name)}")
    for name, spec in overrides.items():
        by_name[name] = _customized(family, by_name[name], spec)
    return [by_name[d.name] for d in dims]


def _customized(family: str, dim: Dim, spec: Any) -> Dim:
    where = f"{family}.{dim.name}"
    if isinstance(spec, str) and ".." in spec:
        low, high = (parse_value(part) for part in spec.split("..", 1))
        spec = {"low": low, "high": high}
    if isinstance(spec, dict):
        if dim.choices is not None:
            raise UserError(f"{where} is a choice among {dim.describe()}; give a list or one value, not a range")
        if set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise UserError(f"{where}: a range is {{low = ..., high = ...[, log = true]}}, got {spec}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
        if low > high:
            raise UserError(f"{where}: empty range, low {low} > high {high}")
        log = bool(spec.get("log", dim.log))
        if log and low <= 0:
            raise UserError(f"{where}: a log range needs low > 0, got {low}")
        if dim.integer and (int(low) != low or int(high) != high):
            raise UserError(f"{where} is an integer; got {low}..{high}")
        return replace(dim, low=low, high=high, log=log)
    if isinstance(spec, list) or dim.choices is not None:
        spec = spec if isinstance(spec, list) else [spec]
        if not spec:
            raise UserError(f"{where}: empty list of choices")
        allowed = NAMED_CHOICES.get(dim.name)
        unknown = [v for v in spec if allowed is not None and v not in allowed]
        if unknown:
            raise UserError(f"{where}: unknown value {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
        if dim.choices is None:
            bad = [v for v in spec if isinstance(v, bool) or not isinstance(v, (int, float))]
            if bad:
                raise UserError(f"{where} is numeric; got {bad}")
            if dim.integer and any(int(v) != v for v in spec):
                raise UserError(f"{where} is an integer; got {spec}")
        return replace(dim, choices=tuple(spec), low=None, high=None, log=False)
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise UserError(f"{where} is numeric ({dim.describe()}); got {spec!r}")
    if dim.integer and int(spec) != spec:
        raise UserError(f"{where} is an integer; got {spec}")
    return replace(dim, low=spec, high=spec, log=False)


def load_space_file(path: Path | str) -> dict[str, dict[str, Any]]:
    """A TOML file with one table per model family, e.g. [cnn] lr = {low = 1e-4, high = 1e-2}; epochs = 10."""
    path = Path(path)
    try:
        content = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"space file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"space file {path} is not valid TOML: {error}") from None
    for family, table in content.items():
        get_family_or_error(family, f"space file {path}")
        if not isinstance(table, dict):
            raise UserError(f"space file {path}: [{family}] must be a table of parameters")
    return content


def get_family_or_error(family: str, where: str = "") -> None:
    if family not in FAMILIES:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}unknown model {family!r}; choose from {', '.join(FAMILIES)}")


def build_space(family: str, file_overrides: dict[str, Any] | None = None,
                cli_overrides: dict[str, Any] | None = None) -> list[Dim]:
    """The family's space, with the space file's table for it, then the command line's, applied."""
    get_family_or_error(family)
    dims = customize(family, SPACES[family], file_overrides or {})
    return customize(family, dims, cli_overrides or {})


def reference_trial(family: str, dims: list[Dim]) -> dict[str, Any]:
    """The study's setting restricted to what the space allows, for enqueueing as a first trial."""
    reference = REFERENCE_PARAMS[family]
    return {d.name: reference[d.name] for d in dims if d.name in reference and d.contains(reference[d.name])}


def space_table(dims: list[Dim]) -> str:
    width = max(len(d.name) for d in dims) + 2
    return "\n".join(f"{d.name:<{width}}{d.describe()}" for d in dims)


"""The command line's options, each defined once, and how the commands read them.

`search.cli` builds the parser from these; the command modules import them. Nothing outside
`search/commands/` and `search/cli.py` imports this module.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any, Sequence

from data import DATASETS
from search.errors import UserError
from search.family import families, load_family_file, parse_families
from search.pipeline import STORED_DATA_FIELDS, DataConfig, default_cache_dir
from search.space import parse_value
from search.storage import DEFAULT_STORAGE

_PREFIX = re.compile(r"[A-Za-z0-9_.-]*")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"stl10-search: error: {message} (see {self.prog} --help)\n")


def parse_assignments(items: Sequence[str] | None, flag: str = "--param") -> dict[str, Any]:
    """["lr=0.001", "optimizer=adam,sgd", "lr=1e-4..1e-2"] -> {"lr": 0.001, "optimizer": ["adam", "sgd"], ...}."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"{flag} takes key=value, got {item!r}")
        value = value.strip()
        if ".." in value:
            result[key.strip()] = value  # a range, read by the search space
        elif "," in value:
            result[key.strip()] = [parse_value(v) for v in value.split(",") if v.strip()]
        else:
            result[key.strip()] = parse_value(value)
    return result


def model_help() -> str:
    return ", ".join(families())


def add_model_argument(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    kwargs: dict[str, Any] = {"required": True} if default is None else {"default": default}
    parser.add_argument("--model", help=f"{what}: {model_help()}", **kwargs)
    parser.add_argument("--family-file", action="append", type=Path, metavar="PATH.py",
                        help="a Python file defining your own model family (see the README); repeatable")


def models(args: argparse.Namespace) -> list[str]:
    """The --model list, after registering the families of any --family-file."""
    for path in args.family_file or []:
        load_family_file(path)
    return parse_families(args.model)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data options; None means "not given", so a worker can tell a host override from a default."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, help="stl10 (default; downloaded once) or imagefolder")
    group.add_argument("--data-root", type=Path, help="dataset folder (default: under ~/.cache/stl10-search)")
    group.add_argument("--val-fraction", type=float, help="share of train held out for validation (default 0.3 = 3,500/1,500)")
    group.add_argument("--split-seed", type=int, help="seed of the stratified train/validation split (default 0)")
    group.add_argument("--image-size", type=int, help="input side in pixels (default: the model's; MobileNetV2 searches it)")
    group.add_argument("--cache-dir", type=Path, help="decoded images and backbone features (default ~/.cache/stl10-search)")
    group.add_argument("--weights", help="MobileNetV2 weights: imagenet (default, torchvision download), "
                                         "a state-dict PATH, or none")


def data_given(args: argparse.Namespace) -> bool:
    """Whether the command line names any stored data setting (a host's cache folder is not one)."""
    return any(getattr(args, name, None) is not None for name in STORED_DATA_FIELDS)


def data_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig the command line asks for, defaults filled in."""
    defaults = DataConfig()
    val_fraction = defaults.val_fraction if args.val_fraction is None else args.val_fraction
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if args.image_size is not None and not 8 <= args.image_size <= 1024:
        raise UserError(f"--image-size must be between 8 and 1024, got {args.image_size}")
    if args.dataset == "imagefolder" and (args.data_root is None or not args.data_root.is_dir()):
        where = f"{args.data_root} is not a folder; " if args.data_root is not None else ""
        raise UserError(f"{where}--dataset imagefolder needs --data-root DIR (with DIR/train/<class>/ and "
                        "DIR/test/<class>/)")
    weights = args.weights or defaults.weights
    if weights not in ("imagenet", "none"):
        weights = str(Path(weights).expanduser().resolve())
    return DataConfig(
        dataset=args.dataset or defaults.dataset,
        data_root=args.data_root.expanduser().resolve() if args.data_root else None,
        val_fraction=val_fraction,
        split_seed=defaults.split_seed if args.split_seed is None else args.split_seed,
        image_size=args.image_size,
        cache_dir=args.cache_dir or default_cache_dir(),
        weights=weights,
    )


def host_data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """This host's cache folder, data folder and weights, where given: they override what the study stored."""
    values = {name: getattr(args, name, None) for name in ("cache_dir", "data_root", "weights")}
    return {name: value for name, value in values.items() if value is not None}


def duration(text: str) -> float:
    """--time-budget: "90" or "90s", "30m", "2h", "1h30m" -> seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"--time-budget takes a duration like 90s, 30m, 2h or 1h30m, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"--time-budget must be longer than zero, got {text!r}")
    return total


def study_prefix(text: str) -> str:
    """--study-prefix: letters, digits, '_', '.' and '-' only, since it names lock and checkpoint files too."""
    if not _PREFIX.fullmatch(text) or ".." in text:
        raise argparse.ArgumentTypeError(f"--study-prefix {text!r} may hold only letters, digits, '_', '.' and '-' "
                                         "(no '/' and no '..')")
    return text


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=None,
                        help=f"{DEFAULT_STORAGE} (default), postgresql://user:pw@host/db or journal:PATH "
                             "(or set STL10_SEARCH_STORAGE)")
    parser.add_argument("--study-prefix", default="", type=study_prefix,
                        help="prefix of the study names (default: none, a study per model)")


def storage_url(args: argparse.Namespace) -> str:
    return args.storage or os.environ.get("STL10_SEARCH_STORAGE") or DEFAULT_STORAGE


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    budgets = ", ".join(f"{name} {family.n_trials}" for name, family in families().items())
    parser.add_argument("--n-trials", type=int,
                        help=f"finished trials per study, shared by all workers (default for a new study: {budgets})")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="fix (lr=0.001), narrow (lr=1e-4..1e-2) or restrict (optimizer=adam,sgd) a parameter; "
                             "prefix with a model to target one (cnn.n_conv=3); repeatable; see `stl10-search space`")
    parser.add_argument("--space", type=Path, help="TOML file: one [model] table of fixed values, {low, high} ranges or lists")
    parser.add_argument("--enqueue-reference", action="store_true", help="run the study's hand-found settings first")
    parser.add_argument("--sampler", default=None, help="tpe (default), random or gp")
    parser.add_argument("--pruner", default=None, help="hyperband (default), halving, median or none")
    parser.add_argument("--seed", type=int, default=None, help="study seed (default 0)")
    parser.add_argument("--checkpoint-dir", type=Path, help="save each trial's last epoch; a re-run trial resumes there")
    parser.add_argument("--heartbeat-interval", type=int, default=None, help="seconds between trial heartbeats (default 30)")
    parser.add_argument("--grace-period", type=int, default=None, help="seconds without heartbeat before a trial "
                                                                        "counts as dead (default 120)")
    add_storage_argument(parser)
    add_data_arguments(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (the first GPU if any, else the CPU), cpu, cuda or cuda:N")


def add_artifacts_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path,
                        help="weights folder (default: $STL10_SEARCH_ARTIFACTS, else artifacts/ beside a SQLite or "
                             "journal file, else ~/.local/share/stl10-search/artifacts/HOST-PORT-DB for a server)")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3, counted within CUDA_VISIBLE_DEVICES when "
                                       "it is set (default: every GPU found; none: CPU)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="worker processes per GPU (small models: 2-4)")
    parser.add_argument("--workers", type=int, help="CPU worker processes when no GPU is used (default 1); "
                                                    "0 creates the studies only")
    parser.add_argument("--log-dir", default="logs", help="where worker logs go (default ./logs)")
    parser.add_argument("--time-budget", type=duration, metavar="DURATION",
                        help="wall time for the whole search, e.g. 30m or 2h, shared by all workers and split over "
                             "the models by their default budgets; with --n-trials, whichever comes first ends it")
    parser.add_argument("--warm-start", metavar="URL[#STUDY]",
                        help="first try the best settings of an earlier study (another storage or dataset too), "
                             "as far as they fit the current space")
    parser.add_argument("--warm-start-k", type=int, default=5, help="how many of its best settings (default 5)")


def quiet_optuna() -> None:
    """Our own lines say what happens; Optuna's experimental-feature notices would only bury them."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

"""The command line's options, each defined once, and how the commands read them.

`search.cli` builds the parser from these; the command modules import them. Nothing outside
`search/commands/` and `search/cli.py` imports this module.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from data.errors import DATASETS
from search.environment import (ARTIFACTS_ENV, CACHE_DIR_ENV, DATA_ROOT_ENV, DEFAULT_STORAGE, DEVICE_ENV, STORAGE_ENV,
                                from_environment, path_from_environment)
from search.errors import UserError
from search.sampling import PRUNERS, SAMPLERS
from search.space import parse_value
from search.trackers import TRACKERS, describe as describe_trackers, parse_spec as parse_tracker

if TYPE_CHECKING:
    from search.pipeline import DataConfig
    from search.services.results import BestRequest, ReportRequest, StudiesRequest
    from search.services.searching import SearchOutcome, SearchRequest, WorkerRequest

_PREFIX = re.compile(r"[A-Za-z0-9_.-]*")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


QUIET, NORMAL, VERBOSE = 0, 1, 2
_verbosity = NORMAL


def set_verbosity(args: argparse.Namespace) -> None:
    """-q: results and problems only (no progress, no informational lines); -v: Optuna's own log lines and the
    traceback behind a one-line error too."""
    global _verbosity
    _verbosity = QUIET if getattr(args, "quiet", False) else VERBOSE if getattr(args, "verbose", False) else NORMAL


def verbosity() -> int:
    return _verbosity


def say(message: str) -> None:
    """An informational line on stderr; with -q only warnings and errors are shown."""
    if _verbosity > QUIET or message.startswith(("warning", "stl10-search:", "skipped")):
        print(message, file=sys.stderr, flush=True)


def common_options() -> argparse.ArgumentParser:
    """-q/--quiet and -v/--verbose, which every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print results and problems only: no progress, "
                                                                  "no informational lines")
    group.add_argument("-v", "--verbose", action="store_true", help="also Optuna's own log lines, and the traceback "
                                                                    "behind an error")
    return common


def add_json_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


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
    """The model names, found without importing any family (which would import torch): the modules of
    search/families/ (each defines the family of its own name) and the entry points of installed packages."""
    import importlib.metadata
    import pkgutil

    import search.families

    built_in = [i.name for i in pkgutil.iter_modules(search.families.__path__) if not i.name.startswith("_")]
    installed = [e.name for e in importlib.metadata.entry_points(group=search.families.ENTRY_POINT_GROUP)]
    return ", ".join(sorted(built_in) + sorted(installed))


def add_model_argument(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    kwargs: dict[str, Any] = {"required": True} if default is None else {"default": default}
    parser.add_argument("--model", help=f"{what}: {model_help()}", **kwargs)
    parser.add_argument("--family-file", action="append", type=Path, metavar="PATH.py",
                        help="a Python file defining your own model family (see the README); repeatable")


def models(args: argparse.Namespace) -> list[str]:
    """The --model list, after registering the families of any --family-file."""
    from search.family import load_family_file, parse_families

    for path in args.family_file or []:
        load_family_file(path)
    return parse_families(args.model)


def add_data_root_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--data-root", type=Path, default=path_from_environment(DATA_ROOT_ENV),
                        help="the dataset folder (default: under ~/.cache/stl10-search); for `best`, `worker` and "
                             "`report`, this host's copy when it is not where the study stored it "
                             f"(or set {DATA_ROOT_ENV})")


def add_cache_dir_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--cache-dir", type=Path, default=path_from_environment(CACHE_DIR_ENV),
                        help="this host's cache of decoded images and backbone features (default "
                             f"~/.cache/stl10-search; or set {CACHE_DIR_ENV})")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data options; None means "not given", so a worker can tell a host override from a default."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, help="stl10 (default; downloaded once) or imagefolder")
    add_data_root_argument(group)
    group.add_argument("--val-fraction", type=float, help="share of train held out for validation (default 0.3 = 3,500/1,500)")
    group.add_argument("--split-seed", type=int, help="seed of the stratified train/validation split (default 0)")
    group.add_argument("--image-size", type=int, help="input side in pixels (default: the model's; MobileNetV2 searches it)")
    add_cache_dir_argument(group)
    group.add_argument("--weights", help="pretrained weights for the models that take them: imagenet (default, "
                                         "downloaded once), a state-dict PATH, or none")


def data_given(args: argparse.Namespace) -> bool:
    """Whether the command line names any stored data setting (a host's cache folder is not one)."""
    from search.pipeline import STORED_DATA_FIELDS

    return any(getattr(args, name, None) is not None for name in STORED_DATA_FIELDS)


def data_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig the command line asks for, defaults filled in."""
    from search.pipeline import DataConfig, default_cache_dir

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
                             f"(or set {STORAGE_ENV})")
    parser.add_argument("--study-prefix", default="", type=study_prefix,
                        help="prefix of the study names (default: none, a study per model)")


def pack_argument(text: str) -> int | None:
    """--pack: a number of trials per pack (at least 1), or auto (None)."""
    if text.strip().lower() == "auto":
        return None
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pack takes a number of trials or auto, got {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"--pack must be at least 1, got {size}")
    return size


def storage_url(args: argparse.Namespace) -> str:
    return args.storage or from_environment(STORAGE_ENV) or DEFAULT_STORAGE


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-trials", type=int,
                        help="finished trials per study, shared by all workers (default for a new study: the model's "
                             "own budget, see `stl10-search space`)")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="fix (lr=0.001), narrow (lr=1e-4..1e-2) or restrict (optimizer=adam,sgd) a parameter; "
                             "prefix with a model to target one (cnn.n_conv=3); repeatable; see `stl10-search space`")
    parser.add_argument("--space", type=Path, help="TOML file: one [model] table of fixed values, {low, high} ranges or lists")
    parser.add_argument("--enqueue-reference", action="store_true", help="run the study's hand-found settings first")
    parser.add_argument("--sampler", default=None, choices=SAMPLERS.names(), help=SAMPLERS.describe())
    parser.add_argument("--pruner", default=None, choices=PRUNERS.names(), help=PRUNERS.describe())
    parser.add_argument("--study-seed", type=int, default=None,
                        help="seed of the study's sampler; trial i gets seed study-seed + i (default 0)")
    parser.add_argument("--checkpoint-dir", type=Path, help="save each trial's last epoch; a re-run trial resumes there")
    parser.add_argument("--pack", type=pack_argument, default=None, metavar="K|auto",
                        help="train up to K trials of one shape as one stacked model (trial packs): auto (default) "
                             "packs where it pays (small models; on a GPU as many as half its free memory holds), "
                             "1 trains every trial alone")
    parser.add_argument("--heartbeat-interval", type=int, default=None, help="seconds between trial heartbeats (default 30)")
    parser.add_argument("--grace-period", type=int, default=None, help="seconds without heartbeat before a trial "
                                                                        "counts as dead (default 120)")
    add_storage_argument(parser)
    add_track_argument(parser)
    add_data_arguments(parser)


def add_track_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--track, repeatable; a tracker whose package is missing is a UserError when the command line is read."""
    parser.add_argument("--track", action="append", type=parse_tracker, required=required,
                        metavar="{" + ",".join(TRACKERS.names()) + "}[:TARGET]",
                        help=f"send trials and tested results to an experiment tracker (repeatable): "
                             f"{describe_trackers()}")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=from_environment(DEVICE_ENV) or "auto",
                        help=f"auto (the first GPU if any, else the CPU), cpu, cuda or cuda:N (or set {DEVICE_ENV})")


def add_artifacts_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", type=Path,
                        help=f"weights folder (default: ${ARTIFACTS_ENV}, else artifacts/ beside a SQLite or "
                             "journal file, else ~/.local/share/stl10-search/artifacts/HOST-PORT-DB for a server)")


def add_full_train_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full-train", action="store_true", help="retrain the best trials on train+validation, "
                                                                  "not train alone")


def add_out_argument(parser: argparse.ArgumentParser, default: Path | None = Path("report"),
                     what: str = "report folder (default ./report)") -> None:
    parser.add_argument("--out", type=Path, default=default, help=what)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3, counted within CUDA_VISIBLE_DEVICES when "
                                       "it is set (default: every GPU found; none: CPU)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="worker processes per GPU (small models: 2-4)")
    parser.add_argument("--workers", type=int, help="CPU worker processes when no GPU is used (default 1); "
                                                    "0 creates the studies only")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="start every worker asked for, even more than the cores, memory or GPU memory hold "
                             "(default: warn and start as many as fit)")
    parser.add_argument("--log-dir", default="logs", help="where worker logs go (default ./logs)")
    parser.add_argument("--time-budget", type=duration, metavar="DURATION",
                        help="wall time for the whole search, e.g. 30m or 2h, shared by all workers and split over "
                             "the models by their default budgets; with --n-trials, whichever comes first ends it")
    parser.add_argument("--warm-start", metavar="URL[#STUDY]",
                        help="first try the best settings of an earlier study (another storage or dataset too), "
                             "as far as they fit the current space")
    parser.add_argument("--warm-start-k", type=int, default=5, help="how many of its best settings (default 5)")


def quiet_optuna(verbose: bool = False) -> None:
    """Our own lines say what happens; Optuna's experimental-feature notices and INFO lines would only bury them
    (-v shows its INFO lines)."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def search_request(args: argparse.Namespace) -> SearchRequest:
    """The search the command line asks for (`search`, `run`, and `worker` for the studies it works)."""
    from search.services.searching import SearchRequest, space_overrides

    names = models(args)
    assignments = parse_assignments(args.param)
    return SearchRequest(
        models=names,
        storage=storage_url(args),
        study_prefix=args.study_prefix,
        n_trials=args.n_trials,
        time_budget=getattr(args, "time_budget", None),
        default_time_budget=args.command == "run" and args.n_trials is None,
        space=space_overrides(names, args.space, assignments) if (args.space or args.param) else None,
        sampler=args.sampler,
        pruner=args.pruner,
        study_seed=args.study_seed,
        data=data_config(args) if data_given(args) else None,
        cache_dir=args.cache_dir,
        family_files=list(args.family_file or []),
        enqueue_reference=args.enqueue_reference,
        warm_start=getattr(args, "warm_start", None),
        warm_start_k=getattr(args, "warm_start_k", 5),
        checkpoint_dir=args.checkpoint_dir,
        pack=args.pack,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
        gpus=getattr(args, "gpus", None),
        workers_per_gpu=getattr(args, "workers_per_gpu", 1),
        workers=getattr(args, "workers", None),
        oversubscribe=getattr(args, "oversubscribe", False),
        log_dir=Path(getattr(args, "log_dir", "logs")),
        track=list(getattr(args, "track", None) or []),
        progress=verbosity() > QUIET,
    )


def worker_request(args: argparse.Namespace) -> WorkerRequest:
    from search.services.searching import WorkerRequest

    return WorkerRequest(search=search_request(args), device=args.device, threads=args.threads,
                         host_data=host_data_overrides(args), changes=bool(args.n_trials or args.param or args.space))


def print_search(outcome: SearchOutcome, as_json: bool = False) -> int:
    """The search's summary on stdout (a table, or JSON) and its problems on stderr; returns its exit code."""
    import json

    if as_json:
        print(json.dumps({"studies": outcome.summary_json(), "problems": outcome.problems,
                          "interrupted": outcome.interrupted}, indent=2))
    elif outcome.summary:
        print(outcome.summary)
    for problem in outcome.problems:
        print(f"stl10-search: {problem}", file=sys.stderr)
    return outcome.exit_code


def studies_request(args: argparse.Namespace) -> StudiesRequest:
    """Which finished studies a results command works on: --storage, --study-prefix, --model, --artifacts."""
    from search.services.results import StudiesRequest

    from search.family import load_family_file

    for path in getattr(args, "family_file", None) or []:
        load_family_file(path)
    chosen = getattr(args, "model", None)  # names are checked once the storage's own family files are loaded
    names = None if chosen is None or chosen.strip() == "all" else [n.strip() for n in chosen.split(",") if n.strip()]
    return StudiesRequest(storage=storage_url(args), study_prefix=args.study_prefix, models=names,
                          artifacts=getattr(args, "artifacts", None))


def best_request(args: argparse.Namespace) -> BestRequest:
    from search.services.results import BestRequest

    return BestRequest(**vars(studies_request(args)), full_train=args.full_train, force=getattr(args, "force", False),
                       device=args.device if hasattr(args, "device") else "auto", host_data=host_data_overrides(args),
                       track=list(getattr(args, "track", None) or []))


def report_request(args: argparse.Namespace) -> ReportRequest:
    from search.report import parse_formats
    from search.services.results import ReportRequest

    formats = parse_formats(args.format) if getattr(args, "format", None) else None
    return ReportRequest(**vars(studies_request(args)), out=Path(args.out), formats=formats, cache_dir=args.cache_dir)

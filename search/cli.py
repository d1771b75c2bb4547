"""`stl10-search`: one command line for hand-set runs, search workers, the launcher, results and the dashboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from data import DATASETS
from models import FAMILIES
from search.errors import USER_ERRORS, UserError
from search.spaces import parse_value


class _Parser(argparse.ArgumentParser):
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


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data options; None means "not given", so a worker can tell a host override from a default."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, help="stl10 (default; downloaded once) or imagefolder")
    group.add_argument("--data-root", type=Path, help="dataset folder (default: under ~/.cache/stl10-search)")
    group.add_argument("--val-fraction", type=float, help="share of train held out for validation (default 0.3 = 3,500/1,500)")
    group.add_argument("--split-seed", type=int, help="seed of the stratified train/validation split (default 0)")
    group.add_argument("--image-size", type=int, help="input side in pixels (default 64, MobileNetV2 96)")
    group.add_argument("--cache-dir", type=Path, help="decoded images and backbone features (default ~/.cache/stl10-search)")
    group.add_argument("--weights", help="MobileNetV2 weights: imagenet (default, torchvision download), "
                                         "a state-dict PATH, or none")


def data_config(args: argparse.Namespace):
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


def parse_models(text: str) -> list[str]:
    """"all" or a comma-separated list of model families."""
    names = list(FAMILIES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise UserError(f"unknown model {', '.join(unknown) or repr(text)}; choose from all, {', '.join(FAMILIES)}")
    return names


def add_storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=None,
                        help="sqlite:///studies.db (default), postgresql://user:pw@host/db or journal:PATH "
                             "(or set STL10_SEARCH_STORAGE)")
    parser.add_argument("--study-prefix", default="", help="prefix of the study names (default: none, a study per model)")


def storage_url(args: argparse.Namespace) -> str:
    import os

    from search.storage import DEFAULT_STORAGE

    return args.storage or os.environ.get("STL10_SEARCH_STORAGE") or DEFAULT_STORAGE


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-trials", type=int,
                        help="finished trials per study, shared by all workers (default for a new study: "
                             "logreg 20, mlp 20, cnn 30, mobilenet_frozen 30, mobilenet_finetune 12)")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="fix (lr=0.001), narrow (lr=1e-4..1e-2) or restrict (optimizer=adam,sgd) a parameter; "
                             "prefix with a model to target one (cnn.n_conv=3); repeatable")
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
    parser.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3 (default: every GPU found; none: CPU)")
    parser.add_argument("--workers-per-gpu", type=int, default=1, help="worker processes per GPU (small models: 2-4)")
    parser.add_argument("--workers", type=int, help="CPU worker processes when no GPU is used (default 1); "
                                                    "0 creates the studies only")
    parser.add_argument("--log-dir", default="logs", help="where worker logs go (default ./logs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stl10-search", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="one hand-set run, printing a per-epoch table")
    train.add_argument("--model", required=True, help=", ".join(FAMILIES))
    train.add_argument("--param", action="append", metavar="KEY=VALUE", help="set a hyperparameter (repeatable)")
    train.add_argument("--epochs", type=int, help="number of epochs (default: the model's reference setting)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--test", action="store_true", help="also score the trained model on the test split")
    add_data_arguments(train)
    add_device_argument(train)
    train.set_defaults(handler="search.commands.train:run_train")

    search = commands.add_parser("search", help="create the studies, start workers, show progress, print a summary")
    search.add_argument("--model", default="all", help="all, or a comma-separated list of models")
    add_search_arguments(search)
    add_launch_arguments(search)
    search.set_defaults(handler="search.commands.search:run_search")

    worker = commands.add_parser("worker", help="one worker process pulling trials from shared storage")
    worker.add_argument("--model", required=True, help="a model, or a comma-separated list worked through in turn")
    add_search_arguments(worker)
    add_device_argument(worker)
    worker.add_argument("--threads", type=int, help="CPU threads for this worker (default: torch's own choice)")
    worker.set_defaults(handler="search.commands.search:run_worker")

    best = commands.add_parser("best", help="retrain the best trial of each study and score it once on test")
    best.add_argument("--model", default="all", help="all (default), or a comma-separated list of models")
    add_storage_argument(best)
    best.add_argument("--full-train", action="store_true", help="retrain on train+validation, not train alone")
    best.add_argument("--force", action="store_true", help="retrain even when a result is stored")
    add_artifacts_argument(best)
    add_device_argument(best)
    best.add_argument("--cache-dir", type=Path, help="this host's cache folder (default ~/.cache/stl10-search)")
    best.add_argument("--data-root", type=Path, help="this host's dataset folder, if not the one the study stored")
    best.set_defaults(handler="search.commands.results:run_best")

    report = commands.add_parser("report", help="write the results of every study as Markdown, HTML, JSON and CSV")
    report.add_argument("--out", type=Path, default=Path("report"), help="output folder (default ./report)")
    report.add_argument("--format", default="md,html,json,csv", help="any of md,html,json,csv (default all)")
    add_storage_argument(report)
    report.add_argument("--cache-dir", type=Path, help="cache folder for the data pictures (default ~/.cache/stl10-search)")
    report.set_defaults(handler="search.commands.results:run_report")

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard on the storage, with the weights artifacts")
    add_storage_argument(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    dashboard.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    dashboard.add_argument("--allow-remote", action="store_true",
                           help="allow a --host other than loopback: optuna-dashboard has no login, and anyone "
                                "who reaches it can delete studies and artifacts")
    add_artifacts_argument(dashboard)
    dashboard.set_defaults(handler="search.commands.results:run_dashboard")

    run = commands.add_parser("run", help="the whole job: search, then best, then report (run again to continue)")
    run.add_argument("--model", default="all", help="all (default), or a comma-separated list of models")
    add_search_arguments(run)
    add_launch_arguments(run)
    run.add_argument("--full-train", action="store_true", help="retrain the best trials on train+validation")
    add_artifacts_argument(run)
    run.add_argument("--out", type=Path, default=Path("report"), help="report folder (default ./report)")
    run.set_defaults(handler="search.commands.results:run_run")
    return parser


def quiet_optuna() -> None:
    """Our own lines say what happens; Optuna's experimental-feature notices would only bury them."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_optuna()
    module_name, function_name = args.handler.split(":")
    try:
        import importlib

        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(args) or 0)
    except USER_ERRORS as error:
        print(f"stl10-search: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stl10-search: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

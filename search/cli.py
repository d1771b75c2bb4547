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
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_assignments(items: Sequence[str] | None, flag: str = "--param") -> dict[str, Any]:
    """["lr=0.001", "optimizer=sgd"] -> {"lr": 0.001, "optimizer": "sgd"}."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"{flag} takes key=value, got {item!r}")
        result[key.strip()] = value.strip() if ".." in value else parse_value(value)
    return result


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, default="stl10", help="stl10 (downloaded once) or imagefolder")
    group.add_argument("--data-root", type=Path, help="dataset folder (default: under ~/.cache/stl10-search)")
    group.add_argument("--val-fraction", type=float, default=0.3, help="share of train held out for validation (0.3 = 3,500/1,500)")
    group.add_argument("--split-seed", type=int, default=0, help="seed of the stratified train/validation split")
    group.add_argument("--image-size", type=int, help="input side in pixels (default 64, MobileNetV2 96)")
    group.add_argument("--cache-dir", type=Path, help="decoded images and backbone features (default ~/.cache/stl10-search)")
    group.add_argument("--weights", default="imagenet",
                       help="MobileNetV2 weights: imagenet (torchvision download), a state-dict PATH, or none")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def data_config(args: argparse.Namespace):
    from search.pipeline import DataConfig, default_cache_dir

    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.image_size is not None and not 8 <= args.image_size <= 1024:
        raise UserError(f"--image-size must be between 8 and 1024, got {args.image_size}")
    return DataConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        image_size=args.image_size,
        cache_dir=args.cache_dir or default_cache_dir(),
        weights=args.weights,
    )


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
    train.set_defaults(handler="search.commands.train:run_train")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

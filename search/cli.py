"""`stl10-search`: one command line for hand-set runs, search workers, the launcher, results and the dashboard."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import Sequence

from search.commands.options import (Parser, add_artifacts_argument, add_cache_dir_argument, add_data_arguments,
                                     add_json_argument,
                                     add_data_root_argument, add_device_argument, add_full_train_argument,
                                     add_launch_arguments, add_model_argument, add_out_argument, add_search_arguments,
                                     add_storage_argument, add_track_argument, common_options, model_help,
                                     quiet_optuna, set_verbosity)
from search.errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="stl10-search", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_completion(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    common = [common_options()]

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=common, help=help)

    train = command("train", "one hand-set run, printing a per-epoch table")
    add_model_argument(train, None, "the model")
    train.add_argument("--param", action="append", metavar="KEY=VALUE", help="set a hyperparameter (repeatable)")
    train.add_argument("--epochs", type=int, help="number of epochs (default: the model's reference setting)")
    train.add_argument("--trial-seed", type=int, default=0, help="seed of the model's initial weights and of the "
                                                                  "batch order (default 0)")
    train.add_argument("--test", action="store_true", help="also score the trained model on the test split")
    add_data_arguments(train)
    add_device_argument(train)
    train.set_defaults(handler="search.commands.train:run_train")

    space = command("space", "each model's parameters: searched range, default, when it applies")
    add_model_argument(space, "all", "all (default), or a comma-separated list of models")
    add_json_argument(space, "the parameters as JSON")
    space.set_defaults(handler="search.commands.space:run_space")

    search = command("search", "create the studies, start workers, show progress, print a summary")
    add_model_argument(search, "all", "all, or a comma-separated list of models")
    add_search_arguments(search)
    add_launch_arguments(search)
    add_json_argument(search, "the closing summary")
    search.set_defaults(handler="search.commands.search:run_search")

    worker = command("worker", "one worker process pulling trials from shared storage")
    add_model_argument(worker, None, "a model, or a comma-separated list worked through in turn")
    add_search_arguments(worker)
    add_device_argument(worker)
    worker.add_argument("--threads", type=int, help="CPU threads for this worker (default: torch's own choice)")
    worker.set_defaults(handler="search.commands.search:run_worker")

    best = command("best", "retrain the best trial of each study and score it once on test")
    add_model_argument(best, "all", "all (default), or a comma-separated list of models")
    add_storage_argument(best)
    add_full_train_argument(best)
    best.add_argument("--force", action="store_true", help="retrain even when a result is stored")
    add_json_argument(best, "each study's result (the stored BestResult)")
    add_artifacts_argument(best)
    add_device_argument(best)
    add_cache_dir_argument(best)
    add_data_root_argument(best)
    add_track_argument(best)
    best.set_defaults(handler="search.commands.results:run_best")

    track = command("track", "send the stored trials and tested best of finished studies to "
                                              "experiment trackers")
    add_model_argument(track, "all", "all (default), or a comma-separated list of models")
    add_storage_argument(track)
    add_track_argument(track, required=True)
    track.set_defaults(handler="search.commands.track:run_track")

    report = command("report", "write the results of every study as Markdown, HTML, JSON and CSV")
    add_out_argument(report)
    report.add_argument("--format", default="md,html,json,csv", help="any of md,html,json,csv (default all)")
    add_storage_argument(report)
    add_cache_dir_argument(report)
    report.set_defaults(handler="search.commands.results:run_report")

    dashboard = command("dashboard", "optuna-dashboard on the storage, with the weights artifacts")
    add_storage_argument(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    dashboard.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    dashboard.add_argument("--allow-remote", action="store_true",
                           help="allow a --host other than loopback: optuna-dashboard has no login, and anyone "
                                "who reaches it can delete studies and artifacts")
    add_artifacts_argument(dashboard)
    dashboard.set_defaults(handler="search.commands.results:run_dashboard")

    export = command("export", "write each study's retrained best as a bundle: weights, config, "
                                                 "torch.export program, ONNX, README")
    add_model_argument(export, "all", "all (default), or a comma-separated list of models")
    add_storage_argument(export)
    add_artifacts_argument(export)
    add_out_argument(export, Path("bundles"), "bundles go to OUT/<study> (default ./bundles)")
    export.add_argument("--format", help="any of safetensors,pt2,onnx (safetensors always; default all, onnx when "
                                         "its packages are installed: pip install 'stl10-search[onnx]')")
    export.set_defaults(handler="search.commands.export:run_export")

    predict = command("predict", "top-k classes of images with a bundle or a study's stored best")
    predict.add_argument("images", nargs="*", type=Path, metavar="IMAGE", help="image files (or use --folder)")
    predict.add_argument("--folder", type=Path, help="every image under DIR; DIR/<class>/ also gets accuracy and a "
                                                     "confusion matrix")
    predict.add_argument("--bundle", type=Path, help="a bundle folder written by `stl10-search export`")
    predict.add_argument("--model", help=f"or the model `best` stored in --storage: {model_help()}")
    add_storage_argument(predict)
    add_artifacts_argument(predict)
    predict.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    add_out_argument(predict, None, "write the predictions to a .csv or .jsonl file (default: print)")
    predict.add_argument("--batch-size", type=int, help="images per batch (default: as `best` tests)")
    add_device_argument(predict)
    predict.set_defaults(handler="search.commands.export:run_predict", family_file=None)

    run = command("run", "the whole job: search, then best, then report (run again to continue)")
    add_model_argument(run, "all", "all (default), or a comma-separated list of models")
    add_search_arguments(run)
    add_launch_arguments(run)
    add_full_train_argument(run)
    add_artifacts_argument(run)
    add_out_argument(run)
    add_json_argument(run, "the search's closing summary")
    run.set_defaults(handler="search.commands.results:run_run")
    return parser


def add_completion(parser: argparse.ArgumentParser) -> None:
    """--print-completion bash|zsh|tcsh, from shtab when it is installed (`pip install 'stl10-search[completion]'`)."""
    try:
        import shtab
    except ImportError:
        return
    shtab.add_argument_to(parser, ["--print-completion"], help="print a shell completion script: bash, zsh or tcsh")


def version() -> str:
    """This project's installed version; a checkout run without installing says so."""
    import importlib.metadata

    try:
        return importlib.metadata.version("stl10-search")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        if argv is not None:  # run from Python: sys.argv is not this command
            from search.provenance import record_command

            record_command(argv)
        set_verbosity(args)
        quiet_optuna(getattr(args, "verbose", False))
        module_name, function_name = args.handler.split(":")
        handler = getattr(importlib.import_module(module_name), function_name)
        return int(handler(args) or 0)
    except USER_ERRORS as error:
        if args is not None and getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"stl10-search: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stl10-search: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`stl10-search best`, `report`, `dashboard`, and `run` (search, then best, then report, in one command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from data import printable
from search.best import format_result
from search.commands.options import (best_request, print_search, report_request, say, search_request,
                                     studies_request)
from search.errors import UserError
from search.services.results import (DashboardRequest, RunRequest, Tested, retrain_best, run, serve_dashboard,
                                     write_report)
from search.services.searching import SearchOutcome


def run_best(args: argparse.Namespace) -> int:
    outcome = retrain_best(best_request(args), say)
    if not outcome.tested:
        raise UserError("; ".join(outcome.problems))
    if args.json:
        print(json.dumps([{"study": t.study, "retrained": t.retrained, "result": t.result.to_json()}
                          for t in outcome.tested], indent=2))
    for tested in [] if args.json else outcome.tested:
        print(format_result(tested.study, tested.result), flush=True)
    for problem in outcome.problems:
        say(f"skipped: {problem}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    request = report_request(args)
    print_written(request.out, write_report(request, say))
    return 0


def print_written(out: Path, written: list[Path]) -> None:
    main = next((p for p in written if p.name == "report.html"), written[0])
    print(printable(f"report written to {out}/ ({', '.join(p.name for p in written if p.parent == out)}); "
                    f"open {main}"))


def run_dashboard(args: argparse.Namespace) -> int:
    serve_dashboard(DashboardRequest(**vars(studies_request(args)), host=args.host, port=args.port,
                                     allow_remote=args.allow_remote), say)
    return 0


def best_device(gpus: str | None) -> str:
    """The device `run` tests on: the first GPU it searched on, the CPU with --gpus none, else auto."""
    if gpus is None:
        return "auto"
    if gpus.strip().lower() == "none":
        return "cpu"
    return f"cuda:{gpus.split(',')[0].strip()}"


def run_run(args: argparse.Namespace) -> int:
    """Search, then retrain-and-test, then report; run again after an interruption and it continues."""
    request = report_request(args)

    def show(item: Any) -> None:
        if isinstance(item, SearchOutcome):
            print_search(item, args.json)
        elif isinstance(item, Tested):
            print(format_result(item.study, item.result), flush=True)
        else:
            print_written(request.out, item)

    best = best_request(args)
    best.device = best_device(args.gpus)
    return run(RunRequest(search_request(args), best, request), say, show)

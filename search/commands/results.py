"""`stl10-search best`, `report`, `dashboard`, and `run` (search, then best, then report, in one command)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from data import printable
from search.artifacts import artifact_store
from search.best import best_trial, format_result, retrain_and_test, stored_result
from search.commands.options import (host_data_overrides, models, open_existing, print_search, search_request,
                                     storage_url)
from search.errors import USER_ERRORS, StorageUnavailable, UserError
from search.family import get_family
from search.pipeline import resolve_device
from search.storage import RetryingStorage, artifact_dir, redact
from search.studies import existing_study_names, load_settings, load_stored_families, study_name


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def test_best(args: argparse.Namespace, storage: RetryingStorage, url: str, device_name: str
              ) -> tuple[int, list[str]]:
    """Retrain and test the best trial of each chosen study, or print its stored result.

    Returns (studies with a result, one line per study that had none). A storage opened read-only prints
    stored results only: a study that would be retrained is refused in one line, and no plot is saved.
    """
    load_stored_families(storage)
    families = models(args)
    existing = set(existing_study_names(storage))
    names = [study_name(f, args.study_prefix) for f in families]
    missing = [n for n in names if n not in existing]
    if missing and args.model.strip() != "all":
        raise UserError(f"no study {', '.join(map(repr, missing))} in storage {redact(url)}; "
                        f"studies there: {', '.join(sorted(existing)) or 'none'}")
    names = [n for n in names if n in existing]
    if not names:
        raise UserError(f"no stl10-search studies in storage {redact(url)}"
                        + (f" with prefix {args.study_prefix!r}" if args.study_prefix else "")
                        + "; run `stl10-search search` first")
    device = resolve_device(device_name)
    tested, problems = 0, []
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        try:
            trial = best_trial(study)
            result = None if getattr(args, "force", False) else stored_result(study, trial, args.full_train)
            if result is None and storage.read_only:
                raise storage.read_only_error("--force retrains and stores the result" if getattr(args, "force", False)
                                              else f"study {name!r} has no stored result for trial #{trial.number}, "
                                                   "and retraining would store one")
            if result is None:
                store = artifact_store(url, getattr(args, "artifacts", None))
                result = retrain_and_test(study, store, device, full_train=args.full_train,
                                          data_overrides=host_data_overrides(args), log=_log)
                from search.dashboard import save_dashboard_plots

                save_dashboard_plots(study, result)
                _log(f"[{name}] retrained in {result['seconds']:.1f}s; weights: artifact {result['artifact_id']} "
                     f"in {artifact_dir(url, getattr(args, 'artifacts', None))}")
            else:
                _log(f"[{name}] trial #{trial.number} already tested; printing the stored result (--force retrains)")
        except StorageUnavailable:
            raise  # the storage's fault, not this study's: no other study would fare better
        except USER_ERRORS as error:
            problems.append(str(error))
            continue
        except Exception as error:  # noqa: BLE001 - a family's own code failed; ours would be a bug, raised
            family = get_family(load_settings(study).family)
            if family.origin == "built-in":
                raise
            problems.append(f"[{name}] retraining failed in model family {family.name} ({family.origin}): "
                            f"{type(error).__name__}: {' '.join(str(error).split())}")
            continue
        print(format_result(name, result), flush=True)
        tested += 1
    if tested and not storage.read_only:
        from search.dashboard import save_tradeoff_plots

        save_tradeoff_plots(storage, args.study_prefix)  # trials added since the last retrain are points too
    return tested, problems


def run_best(args: argparse.Namespace) -> int:
    storage, url = open_existing(args)
    tested, problems = test_best(args, storage, url, args.device)
    if not tested:
        raise UserError("; ".join(problems))
    for problem in problems:
        _log(f"skipped: {problem}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from search.report import parse_formats

    formats = parse_formats(args.format)
    storage, url = open_existing(args)
    report(args, storage, url, formats)
    return 0


def report(args: argparse.Namespace, storage: optuna.storages.BaseStorage, url: str, formats: list[str]) -> None:
    from search.report import write_report

    try:
        written = write_report(storage, Path(args.out), formats, prefix=args.study_prefix, storage_name=redact(url),
                               cache_dir=args.cache_dir, log=_log)
    except OSError as error:  # a read-only folder, a full disk, a file where the folder should be
        raise UserError(f"cannot write the report into {args.out} ({error.strerror or error}); "
                        "pass a writable --out folder") from None
    main = next((p for p in written if p.name == "report.html"), written[0])
    print(printable(f"report written to {Path(args.out)}/ "
                    f"({', '.join(p.name for p in written if p.parent == Path(args.out))}); open {main}"))


def run_dashboard(args: argparse.Namespace) -> int:
    from search.dashboard import check_host, serve

    warning = check_host(args.host, args.allow_remote)
    storage, url = open_existing(args)
    if warning:
        _log(warning)
    folder = artifact_dir(url, args.artifacts)
    read_only = " read-only (nothing can be changed from it)" if storage.read_only else ""
    try:
        serve(storage, artifact_store(url, args.artifacts), args.host, args.port,
              on_ready=lambda address: _log(f"optuna-dashboard{read_only} for {redact(url)} (artifacts in {folder}) "
                                            f"on {address} ; Ctrl-C stops"))
    except OSError as error:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({error.strerror or error}); "
                        "pick another --port") from None
    return 0


def _best_device(gpus: str | None) -> str:
    """The device `run` tests on: the first GPU it searched on, the CPU with --gpus none, else auto."""
    if gpus is None:
        return "auto"
    if gpus.strip().lower() == "none":
        return "cpu"
    return f"cuda:{gpus.split(',')[0].strip()}"


def _has_finished_trial(storage: optuna.storages.BaseStorage, name: str) -> bool:
    if name not in existing_study_names(storage):
        return False
    study = optuna.load_study(study_name=name, storage=storage)
    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def run_run(args: argparse.Namespace) -> int:
    """Search, then retrain-and-test, then report; run again after an interruption and it continues."""
    from search.services.searching import search

    code = print_search(search(search_request(args)))
    if code == 130:
        _log("interrupted: run the same command again to continue where it stopped")
        return 130
    storage, url = open_existing(args)
    if code != 0:
        finished = [name for name in models(args) if _has_finished_trial(storage, study_name(name, args.study_prefix))]
        if not finished:
            _log("stl10-search: the search finished no trial (see above): nothing to retrain or report")
            return code
        _log(f"the search had failures (see above); retraining and reporting what finished: {', '.join(finished)}")
    _, problems = test_best(args, storage, url, _best_device(args.gpus))
    for problem in problems:
        _log(f"skipped: {problem}")
    from search.report import FORMATS

    report(args, storage, url, list(FORMATS))
    return code

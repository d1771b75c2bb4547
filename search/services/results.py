"""What becomes of finished studies: `best` (retrain and test), `report`, `dashboard`, `export`, `predict`, and `run`
(a search, then best, then report)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from search.artifacts import artifact_store
from search.best import best_trial, retrain_and_test, stored_result
from search.environment import DEFAULT_STORAGE
from search.errors import USER_ERRORS, StorageReadOnly, StorageUnavailable, UserError
from search.family import families, get_family
from search.pipeline import resolve_device
from search.records import BestResult
from search.services.searching import SearchRequest, search
from search.storage import RetryingStorage, artifact_dir, open_storage, redact, storage_file
from search.studies import existing_study_names, load_settings, load_stored_families, study_name
from search.trackers import TrackerSpec, open_trackers

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_existing(url: str) -> RetryingStorage:
    """The storage of finished studies, refusing to create an empty SQLite file where the user expected them.

    A file this process may not write (a shared result, a read-only mount) is opened read-only: report,
    dashboard and best printing stored results work, and what would write says so in one line.
    """
    path = storage_file(url)
    if path is not None and not path.is_file():
        raise UserError(f"no storage file {path}; run `stl10-search search` (or `run`) first, "
                        "or pass --storage with the URL the search used")
    try:
        return open_storage(url)
    except StorageReadOnly:
        return open_storage(url, read_only=True)


@dataclass
class StudiesRequest:
    """Which finished studies: the storage, the study prefix, and the models (None: every study there)."""

    storage: str = DEFAULT_STORAGE
    models: list[str] | None = None
    study_prefix: str = ""
    artifacts: Path | None = None  # where the weights live (default: see search.storage.artifact_dir)

    def open(self) -> RetryingStorage:
        return open_existing(self.storage)

    def study_names(self, storage: optuna.storages.BaseStorage) -> list[str]:
        """The chosen studies that exist; a model named (not "all") without a study is a UserError."""
        load_stored_families(storage)
        existing = set(existing_study_names(storage))
        names = [study_name(f, self.study_prefix) for f in (self.models or list(families()))]
        missing = [n for n in names if n not in existing]
        if missing and self.models is not None:
            raise UserError(f"no study {', '.join(map(repr, missing))} in storage {redact(self.storage)}; "
                            f"studies there: {', '.join(sorted(existing)) or 'none'}")
        names = [n for n in names if n in existing]
        if not names:
            raise UserError(f"no stl10-search studies in storage {redact(self.storage)}"
                            + (f" with prefix {self.study_prefix!r}" if self.study_prefix else "")
                            + "; run `stl10-search search` first")
        return names


@dataclass
class BestRequest(StudiesRequest):
    """`best`: retrain each chosen study's best trial and score it on test, or print the result it stored."""

    full_train: bool = False
    force: bool = False
    device: str = "auto"
    host_data: dict[str, Any] = field(default_factory=dict)  # this host's cache_dir, data_root, weights
    track: list[TrackerSpec] = field(default_factory=list)


@dataclass
class Tested:
    study: str
    result: BestResult
    retrained: bool  # False: the stored result was printed


@dataclass
class BestOutcome:
    tested: list[Tested] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per study that got no result


def retrain_best(request: BestRequest, log: Log = _stderr, storage: RetryingStorage | None = None) -> BestOutcome:
    """Retrain and test the best trial of each chosen study, unless its result is stored (or `force`).

    A storage opened read-only prints stored results only: a study that would be retrained is refused in one
    line, and no plot is saved. Each result also goes to the request's experiment trackers.
    """
    storage = storage or request.open()
    names = request.study_names(storage)
    device = resolve_device(request.device)
    outcome = BestOutcome()
    trackers = open_trackers(request.track, log)
    try:
        for name in names:
            tested = _test_one(request, storage, name, device, log, outcome.problems)
            if tested is not None:
                outcome.tested.append(tested)
                trackers.best(name, tested.result)
    finally:
        trackers.close()
    if outcome.tested and not storage.read_only:
        from search.dashboard import save_tradeoff_plots

        save_tradeoff_plots(storage, request.study_prefix)  # trials added since the last retrain are points too
    return outcome


def _test_one(request: BestRequest, storage: RetryingStorage, name: str, device: Any, log: Log,
              problems: list[str]) -> Tested | None:
    study = optuna.load_study(study_name=name, storage=storage)
    try:
        trial = best_trial(study)
        result = None if request.force else stored_result(study, trial, request.full_train)
        if result is not None:
            log(f"[{name}] trial #{trial.number} already tested; printing the stored result (--force retrains)")
            return Tested(name, result, retrained=False)
        if storage.read_only:
            raise storage.read_only_error("--force retrains and stores the result" if request.force
                                          else f"study {name!r} has no stored result for trial #{trial.number}, "
                                               "and retraining would store one")
        store = artifact_store(request.storage, request.artifacts)
        result = retrain_and_test(study, store, device, full_train=request.full_train,
                                  data_overrides=request.host_data, log=log)
        from search.dashboard import save_dashboard_plots

        save_dashboard_plots(storage, study, result)
        log(f"[{name}] retrained in {result.seconds:.1f}s; weights: artifact {result.artifact_id} in "
            f"{artifact_dir(request.storage, request.artifacts)}")
        return Tested(name, result, retrained=True)
    except StorageUnavailable:
        raise  # the storage's fault, not this study's: no other study would fare better
    except USER_ERRORS as error:
        problems.append(str(error))
    except Exception as error:  # noqa: BLE001 - a family's own code failed; ours would be a bug, raised
        family = get_family(load_settings(study).family)
        if family.origin == "built-in":
            raise
        problems.append(f"[{name}] retraining failed in model family {family.name} ({family.origin}): "
                        f"{type(error).__name__}: {' '.join(str(error).split())}")
    return None


@dataclass
class ReportRequest(StudiesRequest):
    """`report`: every study of the prefix written as Markdown, HTML, JSON and CSV into `out`."""

    out: Path = Path("report")
    formats: list[str] | None = None  # None: every format
    cache_dir: Path | None = None  # for the data pictures


def write_report(request: ReportRequest, log: Log = _stderr, storage: RetryingStorage | None = None) -> list[Path]:
    """Write the report files; returns their paths. A folder that cannot be written is one line."""
    from search.report import FORMATS, write_report as write

    storage = storage or request.open()
    try:
        return write(storage, request.out, request.formats or list(FORMATS), prefix=request.study_prefix,
                     storage_name=redact(request.storage), cache_dir=request.cache_dir, log=log)
    except OSError as error:  # a read-only folder, a full disk, a file where the folder should be
        raise UserError(f"cannot write the report into {request.out} ({error.strerror or error}); "
                        "pass a writable --out folder") from None


@dataclass
class DashboardRequest(StudiesRequest):
    host: str = "127.0.0.1"
    port: int = 8080
    allow_remote: bool = False


def serve_dashboard(request: DashboardRequest, log: Log = _stderr) -> None:
    """optuna-dashboard on the storage and its weights, until Ctrl-C."""
    from search.dashboard import check_host, serve

    warning = check_host(request.host, request.allow_remote)
    storage = request.open()
    if warning:
        log(warning)
    folder = artifact_dir(request.storage, request.artifacts)
    read_only = " read-only (nothing can be changed from it)" if storage.read_only else ""
    try:
        serve(storage, artifact_store(request.storage, request.artifacts), request.host, request.port,
              on_ready=lambda address: log(f"optuna-dashboard{read_only} for {redact(request.storage)} (artifacts in "
                                           f"{folder}) on {address} ; Ctrl-C stops"))
    except OSError as error:
        raise UserError(f"cannot serve on {request.host}:{request.port} ({error.strerror or error}); "
                        "pick another --port") from None


@dataclass
class ExportRequest(StudiesRequest):
    """`export`: each chosen study's retrained best as a bundle folder OUT/<study>."""

    out: Path = Path("bundles")
    formats: list[str] | None = None  # None: every format whose packages are installed


def export(request: ExportRequest, log: Log = _stderr) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """Write the bundles; returns ([(study, exported bundle, trained model)], one line per study not exported).

    The folder each bundle went to is stored on the study's result, so the report can link it."""
    from search.bundle import export_bundle, parse_formats, stored_model

    formats = request.formats or parse_formats(None)
    if request.formats is None and "onnx" not in formats:
        log("model.onnx left out: the onnx packages are not installed (pip install 'stl10-search[onnx]')")
    storage = request.open()
    artifacts = artifact_dir(request.storage, request.artifacts)
    exported, problems = [], []
    for name in request.study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        try:
            trained = stored_model(study, artifacts)
            done = export_bundle(trained, Path(request.out) / name, formats)
        except USER_ERRORS as error:
            problems.append(str(error))
            continue
        if not storage.read_only:
            result = BestResult.load(study)
            result.bundle = str(Path(done.folder).resolve())
            result.save(study)
        exported.append((name, done, trained))
    return exported, problems


def load_best(request: StudiesRequest) -> Any:
    """The model `best` stored for the request's one study, ready to predict: (model, preprocess, classes,
    config), as `search.bundle.load_bundle` gives a bundle's."""
    from search.bundle import load_best as load

    storage = request.open()
    names = request.study_names(storage)
    if len(names) != 1:
        raise UserError(f"one model at a time; got {', '.join(names)}")
    return load(storage, names[0], artifact_dir(request.storage, request.artifacts))


@dataclass
class RunRequest:
    """`run`: the search, then best on its studies, then the report."""

    search: SearchRequest
    best: BestRequest
    report: ReportRequest


def run(request: RunRequest, log: Log = _stderr, show: Callable[[Any], None] | None = None) -> int:
    """Search, then retrain-and-test, then report; returns the exit code. Run again after an interruption and it
    continues. `show(outcome)` presents the search's outcome and each tested result (the command line prints)."""
    show = show or (lambda item: None)
    outcome = search(request.search, log)
    show(outcome)
    if outcome.interrupted:
        log("interrupted: run the same command again to continue where it stopped")
        return outcome.exit_code
    storage = request.best.open()
    if outcome.exit_code != 0:
        finished = [study.study_name for study in outcome.studies
                    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))]
        if not finished:
            log("stl10-search: the search finished no trial (see above): nothing to retrain or report")
            return outcome.exit_code
        log(f"the search had failures (see above); retraining and reporting what finished: {', '.join(finished)}")
    tested = retrain_best(request.best, log, storage)
    for item in tested.tested:
        show(item)
    for problem in tested.problems:
        log(f"skipped: {problem}")
    show(write_report(request.report, log, storage))
    return outcome.exit_code

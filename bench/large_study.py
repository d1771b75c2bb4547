"""Cost as a study grows: a study filled with N finished trials of the project's own shape, then timed.

    python -m bench.large_study                          # 4, 1,000, 5,000 and 10,000 trials in the study
    python -m bench.large_study --sizes 4,1000 --more 8

Per size it prints one row of the table of issue 19: the trials in the study | 8 more trials (a worker in
this process, on tiny synthetic images, from opening the storage to its last trial; one trial is run untimed
first, so that decoding the images is not counted) | `report` (every format,
a fresh storage) | `best` (retrain the best trial on the tiny images, test it, measure its latency, store the
result and plots; in parentheses the retraining and testing alone, which depend on the trial chosen) |
the dashboard's study page (GET /api/studies/<id> on optuna_dashboard.wsgi, first request of a fresh app).

The trials are logistic regressions as a worker would store them: params sampled from the family's space by
the project's own `suggest` (TPE's relative-params attribute beside them), a `TrialRecord` with a 20-epoch
history, the validation accuracy of every epoch as an intermediate value, 30% pruned after 1 to 6 epochs.
They are written straight into Optuna's tables in one transaction (Optuna's `add_trials` takes 38 ms a trial,
six minutes for 10,000), which is the one thing here that reads Optuna's private schema.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from bench.plain import print_table
from bench.search_throughput import write_tiny_dataset
from search.family import get_family
from search.records import TrialRecord
from search.space import suggest
from search.training import EpochMetrics

MODEL = "logreg"
EPOCHS = 20
PRUNED_SHARE = 0.3


def synthetic_trials(count: int, first_number: int, seed: int = 0) -> list[FrozenTrial]:
    """`count` finished trials of the logreg family, numbered from `first_number`, as a worker stores them."""
    family = get_family(MODEL)
    dims = family.dims({"epochs": EPOCHS})
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    rng = random.Random(seed)
    started = datetime.now() - timedelta(seconds=30 * count)
    trials = []
    for i in range(count):
        number = first_number + i
        asked = sampler_study.ask()
        sampled = suggest(asked, dims)
        frozen = sampler_study._storage.get_trial(asked._trial_id)
        pruned = rng.random() < PRUNED_SHARE
        ran = rng.randint(1, 6) if pruned else EPOCHS
        top = rng.uniform(0.2, 0.45)
        history = [EpochMetrics(epoch, 2.3 - 0.05 * epoch, top * epoch / ran, 2.3 - 0.04 * epoch,
                                top * (0.5 + 0.5 * epoch / EPOCHS) + rng.uniform(-0.01, 0.01), 1.5)
                   for epoch in range(1, ran + 1)]
        record = TrialRecord(seed=number, first_number=number, params=family.relevant({**family.resolve(), **sampled}),
                             worker="synthetic:0", device="cpu", threads=2, trainable_parameters=122_890,
                             history=history, seconds=1.5 * ran,
                             provenance={"hostname": "synthetic", "gpus": [], "cpu": "synthetic", "threads": 2})
        best = record.best
        record.best_epoch = best.epoch
        record.reason = (f"pruned at epoch {ran}: validation accuracy {history[-1].val_accuracy:.2%}" if pruned
                         else f"completed {EPOCHS} epochs; best at epoch {best.epoch}")
        start = started + timedelta(seconds=30 * i)
        trials.append(FrozenTrial(
            number=number, state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else best.val_accuracy, datetime_start=start,
            datetime_complete=start + timedelta(seconds=record.seconds), params=frozen.params,
            distributions=frozen.distributions, user_attrs=record.user_attrs(),
            system_attrs={"tpe:relative_params:0": json.dumps(frozen.params)},
            intermediate_values={m.epoch: m.val_accuracy for m in history}, trial_id=-1, values=None))
    return trials


def insert_trials(url: str, study_name: str, count: int, seed: int = 0) -> int:
    """Append `count` synthetic trials to the study in one transaction; returns the trials it then holds.

    Straight into Optuna's tables (its RDB schema, private): the storage's own path is a transaction per trial.
    A storage opened before this call has cached the study without them: open a fresh one.
    """
    from optuna.storages._rdb import models

    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
    try:
        study_id = storage.get_study_id_from_name(study_name)
        with storage.engine.begin() as connection:
            tables = {m: m.__table__ for m in (models.TrialModel, models.TrialParamModel, models.TrialValueModel,
                                               models.TrialIntermediateValueModel, models.TrialUserAttributeModel,
                                               models.TrialSystemAttributeModel)}
            trial_table = tables[models.TrialModel]
            next_id = (connection.execute(optuna_max(trial_table.c.trial_id)).scalar() or 0) + 1
            first_number = connection.execute(optuna_count(trial_table, study_id)).scalar()
            rows: dict[Any, list[dict[str, Any]]] = {m: [] for m in tables}
            for offset, trial in enumerate(synthetic_trials(count, first_number, seed)):
                trial_id = next_id + offset
                rows[models.TrialModel].append({
                    "trial_id": trial_id, "number": trial.number, "study_id": study_id, "state": trial.state.name,
                    "datetime_start": _utc(trial.datetime_start), "datetime_complete": _utc(trial.datetime_complete)})
                for name, value in trial.params.items():
                    distribution = trial.distributions[name]
                    rows[models.TrialParamModel].append({
                        "trial_id": trial_id, "param_name": name, "param_value": distribution.to_internal_repr(value),
                        "distribution_json": distribution_to_json(distribution)})
                if trial.value is not None:
                    rows[models.TrialValueModel].append({"trial_id": trial_id, "objective": 0, "value": trial.value,
                                                         "value_type": "FINITE"})
                for step, value in trial.intermediate_values.items():
                    rows[models.TrialIntermediateValueModel].append({
                        "trial_id": trial_id, "step": step, "intermediate_value": value,
                        "intermediate_value_type": "FINITE"})
                for model, attrs in ((models.TrialUserAttributeModel, trial.user_attrs),
                                     (models.TrialSystemAttributeModel, trial.system_attrs)):
                    rows[model] += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                                    for k, v in attrs.items()]
            for model, table in tables.items():
                if rows[model]:
                    connection.execute(table.insert(), rows[model])
            return first_number + count
    finally:
        storage.engine.dispose()


def optuna_max(column: Any) -> Any:
    import sqlalchemy

    return sqlalchemy.select(sqlalchemy.func.max(column))


def optuna_count(table: Any, study_id: int) -> Any:
    import sqlalchemy

    return sqlalchemy.select(sqlalchemy.func.count()).select_from(table).where(table.c.study_id == study_id)


def _utc(moment: datetime) -> datetime:
    """Optuna's RDB stores naive UTC; a FrozenTrial holds naive local time."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def create_study(url: str, data_root: Path, budget: int) -> None:
    """The logreg study on the tiny images, 20 epochs a trial, `budget` finished trials."""
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update

    settings = StudySettings(MODEL, budget, space={"epochs": EPOCHS},
                             data={"dataset": "imagefolder", "data_root": str(data_root), "val_fraction": 0.3,
                                   "split_seed": 0, "image_size": 16, "weights": None})
    create_or_update(open_storage(url), MODEL, settings)


def finished_trials(url: str) -> int:
    """Complete and pruned trials in the study, counted in SQL (loading them took 15 s at 10,000 before)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(
                "SELECT count(*) FROM trials JOIN studies ON trials.study_id = studies.study_id "
                "WHERE studies.study_name = :name AND trials.state IN ('COMPLETE', 'PRUNED')"), {"name": MODEL}).scalar()
    finally:
        engine.dispose()


def more_trials(url: str, data_root: Path, cache: Path, count: int) -> float:
    """Seconds for a worker in this process to open the storage and run `count` more trials."""
    from search.pipeline import resolve_device
    from search.storage import open_storage
    from search.worker import work

    create_study(url, data_root, finished_trials(url) + count)
    started = time.perf_counter()
    storage = open_storage(url)
    done = work(storage, [MODEL], resolve_device("cpu"), threading.Event(), log=lambda line: None,
                data_overrides={"cache_dir": cache})
    seconds = time.perf_counter() - started
    if done[MODEL] != count:
        raise SystemExit(f"the worker finished {done[MODEL]} trials, not {count}")
    return seconds


def report_seconds(url: str, out: Path) -> float:
    from search.services.results import ReportRequest, write_report

    started = time.perf_counter()
    write_report(ReportRequest(storage=url, out=out), log=lambda line: None)
    return time.perf_counter() - started


def best_seconds(url: str, cache: Path) -> tuple[float, float]:
    """`best`'s seconds, and of those the retraining and testing of the trial (its result's `seconds`), which
    depend on the trial chosen (its epochs, its batch size), not on the study's size."""
    from search.services.results import BestRequest, retrain_best

    started = time.perf_counter()
    outcome = retrain_best(BestRequest(storage=url, models=[MODEL], force=True, device="cpu",
                                       host_data={"cache_dir": cache}), log=lambda line: None)
    if not outcome.tested:
        raise SystemExit(f"best tested nothing: {outcome.problems}")
    return time.perf_counter() - started, outcome.tested[0].result.seconds


def dashboard_seconds(url: str) -> float:
    """The first GET /api/studies/<id> of a fresh optuna-dashboard app on a fresh storage, as a browser opening
    the study page makes it."""
    from optuna_dashboard import wsgi

    from search.storage import open_storage

    started = time.perf_counter()
    storage = open_storage(url)
    app = wsgi(storage)
    study_id = storage.get_study_id_from_name(MODEL)
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/api/studies/{study_id}"}
    setup_testing_defaults(environ)
    body = b"".join(app(environ, lambda code, headers, *rest: status.append(code)))
    seconds = time.perf_counter() - started
    if not status or not status[0].startswith("200") or not json.loads(body).get("trials"):
        raise SystemExit(f"the dashboard answered {status} ({body[:200]!r})")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.large_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,1000,5000,10000",
                        help="synthetic trials to fill the study up to before each row (default 4,1000,5000,10000)")
    parser.add_argument("--more", type=int, default=8, help="real trials each row adds (default 8)")
    parser.add_argument("--work-dir", type=Path, help="keep the storage and reports here (default: a temporary folder)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    import optuna_dashboard  # noqa: F401 - imported once, as the dashboard command does, not inside the timing

    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        work_dir = (args.work_dir or Path(tmp)).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        data_root = write_tiny_dataset(work_dir / "tiny")
        cache = work_dir / "cache"
        url = f"sqlite:///{work_dir / 'studies.db'}"
        create_study(url, data_root, 1)
        more_trials(url, data_root, cache, 1)  # untimed: the images decoded and cached, torch warmed up
        rows = []
        for size in sizes:
            present = finished_trials(url)
            if size > present:
                started = time.perf_counter()
                present = insert_trials(url, MODEL, size - present, seed=size)
                print(f"  filled the study to {present:,} trials in {time.perf_counter() - started:.1f}s", flush=True)
            more = more_trials(url, data_root, cache, args.more)
            trials = finished_trials(url)
            report = report_seconds(url, work_dir / f"report-{size}")
            best, retrain = best_seconds(url, cache)
            dashboard = dashboard_seconds(url)
            rows.append([f"{trials - args.more:,}", f"{more:.1f} s", f"{report:.1f} s",
                         f"{best:.1f} s ({retrain:.1f} s)", f"{dashboard:.2f} s"])
            print(f"  {rows[-1]}", flush=True)
        print()
        print_table(["trials in the study", f"{args.more} more trials", "report", "best (of which retrain and test)",
                     "dashboard study page"], rows)


if __name__ == "__main__":
    main()

"""Studies of thousands of trials: what `report`, `best` and listing the studies read and draw stays bounded.

The studies are filled with the benchmark's synthetic trials (bench/large_study.py: logreg trials as a worker
stores them, 20-epoch records), with the report's bounds made small so that a few dozen trials exceed them.
"""

from __future__ import annotations

import csv
import importlib
import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from bench.large_study import MODEL, create_study, insert_trials
from search.rdb_reads import FastReadRDBStorage
from search.records import TrialRecord
from search.storage import open_storage
from search.studies import existing_study_names, load_stored_families

optuna.logging.set_verbosity(optuna.logging.WARNING)
collect_module = importlib.import_module("search.report.collect")  # search.report's `collect` is a function


def _study(tmp_path: Path, data_root: Path, trials: int, name: str = "studies.db") -> str:
    url = f"sqlite:///{tmp_path / name}"
    create_study(url, data_root, trials)
    assert insert_trials(url, MODEL, trials) == trials
    return url


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collect_module, "PLOTTED_TRIALS", 20)
    monkeypatch.setattr(collect_module, "TABLE_TRIALS", 15)
    monkeypatch.setattr(collect_module, "TABLE_BEST", 5)


@pytest.fixture
def trials_read(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How many trials the storage built (rdb_reads), and how often whole studies were listed for them."""
    counts: Counter = Counter()
    read = FastReadRDBStorage._read

    def counted(connection, where):
        found = read(connection, where)
        counts["trials"] += len(found)
        return found

    monkeypatch.setattr(FastReadRDBStorage, "_read", staticmethod(counted))
    return counts


def test_the_synthetic_trials_read_back_as_a_worker_stores_them(tiny_imagefolder: Path, tmp_path: Path) -> None:
    url = _study(tmp_path, tiny_imagefolder, 30)
    trials = optuna.load_study(study_name=MODEL, storage=url).get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(30))
    assert {t.state for t in trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    for trial in trials:
        record = TrialRecord.load(trial)
        assert list(trial.intermediate_values) == [m.epoch for m in record.history]
        assert len(record.history) == 20 if trial.state == TrialState.COMPLETE else 1 <= len(record.history) <= 6
        assert trial.value == (record.best.val_accuracy if trial.state == TrialState.COMPLETE else None)
        assert record.params["epochs"] == 20 and set(trial.params) <= set(record.params)


def test_listing_the_studies_reads_no_trial(tiny_imagefolder: Path, tmp_path: Path, trials_read: Counter) -> None:
    """optuna.get_all_study_summaries deep-copied every trial of every study to count them: 11 s at 5,000."""
    url = _study(tmp_path, tiny_imagefolder, 30)
    storage = open_storage(url)
    assert existing_study_names(storage) == [MODEL]
    load_stored_families(storage)
    assert trials_read["trials"] == 0


def _trial(number: int, value: float, params: dict[str, float]) -> FrozenTrial:
    return optuna.trial.create_trial(value=value, params=params,
                                     distributions={name: FloatDistribution(0, 1) for name in params})


def test_the_plotted_trials_keep_every_new_best_the_best_and_every_parameter() -> None:
    values = [0.1 * (i % 7) + (0.5 if i in (40, 80) else 0.0) for i in range(100)]
    trials = [_trial(i, v, {"a": 0.5} | ({"rare": 0.5} if i == 13 else {})) for i, v in enumerate(values)]
    for i, trial in enumerate(trials):
        trial.number = i
    chosen = collect_module.plotted_trials(trials, limit=20)
    numbers = [t.number for t in chosen]
    assert len(chosen) == 20 and numbers == sorted(numbers)
    assert {0, 1, 2, 3, 4, 5, 6, 40} <= set(numbers)  # each raised the best value: the history's line is exact
    assert {40, 80} <= set(numbers)  # the best tenth of 20: 1.0 at #40, 0.8 at #80
    assert 13 in numbers  # the only trial with "rare"
    assert collect_module.plotted_trials(trials[:20], limit=20) == trials[:20]  # a small study: every trial


def test_a_large_report_draws_and_tabulates_a_bounded_part_and_writes_every_trial(
        tiny_imagefolder: Path, tmp_path: Path, small_bounds: None) -> None:
    from search.report import write_report
    from search.report.collect import collect
    from search.report.figures import study_figures

    url = _study(tmp_path, tiny_imagefolder, 60)
    storage = open_storage(url)
    write_report(storage, tmp_path / "report", log=lambda line: None)
    (report,) = collect(storage)
    complete = [t for t in report.trials if t.state == TrialState.COMPLETE]
    assert len(report.trials) == 60 and len(complete) > 20

    figures = study_figures(report)
    assert len(report.plotted.study.trials) == 20
    history = figures["optimization history"]
    drawn = [int(x) for trace in history.data for x in trace.x]
    assert set(drawn) <= {t.number for t in complete} and report.best.number in drawn  # the stored numbers
    assert max(y for trace in history.data for y in trace.y) == report.best.value
    bars = figures["parameter importances"].data[0]
    assert dict(zip(bars.y, bars.x)) == pytest.approx(report.importances)  # computed on every completed trial
    assert any(note.startswith("the optimization history, parallel coordinates and importance plots draw 20 of")
               for note in report.notes)

    rows = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
            if line.startswith("| ") and line.split("|")[2].strip() in {"complete", "pruned"}]
    listed = [int(line.split("|")[1].split()[0]) for line in rows]
    best_five = sorted(complete, key=lambda t: (-t.value, t.number))[:5]
    assert len(listed) == 15 and {t.number for t in best_five} <= set(listed) and 59 in listed
    assert "the trial table lists 15 of the 60 trials" in (tmp_path / "report" / "report.md").read_text()

    with open(tmp_path / "report" / "trials.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 60
    studies = json.loads((tmp_path / "report" / "report.json").read_text())["studies"]
    assert len(studies[0]["trials"]) == 60


def test_a_small_report_lists_and_draws_every_trial(tiny_imagefolder: Path, tmp_path: Path) -> None:
    from search.report.collect import collect
    from search.report.figures import study_figures

    (report,) = collect(open_storage(_study(tmp_path, tiny_imagefolder, 30)))
    complete = [t for t in report.trials if t.state == TrialState.COMPLETE]
    figures = study_figures(report)
    drawn = sorted(int(x) for x in figures["optimization history"].data[0].x)
    assert drawn == [t.number for t in complete] and report.table_trials == report.trials
    assert not [note for note in report.notes if "of the" in note]


def test_best_reads_as_many_trials_in_a_large_study_as_in_a_small_one(
        tiny_imagefolder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trials_read: Counter) -> None:
    import search.best
    from search.services.results import BestRequest, retrain_best

    monkeypatch.setattr(collect_module, "PLOTTED_TRIALS", 10)  # the dashboard's figure: 10 newest, the best one
    monkeypatch.setattr(search.best, "measure_latency", lambda model, size, device: {"latency_ms": {"batch_1": 1.0}})
    read = {}
    for trials in (30, 90):
        url = _study(tmp_path, tiny_imagefolder, trials, f"studies-{trials}.db")
        trials_read.clear()
        outcome = retrain_best(BestRequest(storage=url, device="cpu", host_data={"cache_dir": tmp_path / "cache"}),
                               log=lambda line: None)
        assert [tested.study for tested in outcome.tested] == [MODEL]
        read[trials] = trials_read["trials"]
    # the best trial, again for its dashboard curves, and the dashboard figure's 10 newest and best one, whatever
    # the size of the study (the 30-trial study's best may be among its newest)
    assert read[30] <= 14 and read[90] <= 14


def test_best_is_the_earliest_of_equal_best_trials(tiny_imagefolder: Path, tmp_path: Path) -> None:
    from search.best import best_trial

    url = _study(tmp_path, tiny_imagefolder, 30)
    study = optuna.load_study(study_name=MODEL, storage=open_storage(url))
    top = max(t.value for t in study.get_trials(deepcopy=False) if t.value is not None)
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=top, params={}, distributions={}))
    first = min(t.number for t in study.get_trials(deepcopy=False) if t.value == top)
    assert best_trial(study).number == first < 30  # read by SQL (search.rdb_reads), ties to the earliest


def test_a_report_finds_the_interrupted_trials_once_per_study(tiny_imagefolder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each trial's row asked for them: 0.2 s a row at 5,000 trials, 224 s for report.json and trials.csv."""
    from search.report import write_report

    calls = []
    requeued = collect_module.requeued_numbers
    monkeypatch.setattr(collect_module, "requeued_numbers", lambda trials: calls.append(1) or requeued(trials))
    write_report(open_storage(_study(tmp_path, tiny_imagefolder, 30)), tmp_path / "report", ["md", "json", "csv"],
                 log=lambda line: None)
    assert len(calls) == 1

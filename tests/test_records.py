"""Trial records and best results: one owner each, saved and loaded in one place, and read back from a study
written by an earlier release (tests/fixtures/studies_v1.sql)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO_ROOT
from search.records import BestResult, TrialRecord
from search.training import EpochMetrics

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "studies_v1.sql"


@pytest.fixture
def v1_storage(tmp_path: Path) -> str:
    """A SQLite file holding what release 0.1.0 wrote: logreg (reference, complete, pruned, interrupted and
    queued trials, a tested best) and mlp (complete trials)."""
    path = tmp_path / "studies.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(FIXTURE.read_text())
    return f"sqlite:///{path}"


def test_a_record_saved_on_a_trial_loads_back_whole() -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    history = [EpochMetrics(1, 2.0, 0.2, 1.9, 0.25, 0.1), EpochMetrics(2, 1.5, 0.4, 1.6, 0.35, 0.1)]
    record = TrialRecord(seed=7, first_number=0, params={"lr": 0.01, "epochs": 5}, worker="host:1", device="cpu",
                         threads=2, trainable_parameters=10, history=history, best_epoch=2, reason="done", seconds=1.5,
                         provenance={"torch": "2.14.1"})
    record.save(trial)
    study.tell(trial, 0.35)
    assert TrialRecord.load(study.trials[0]) == record
    assert TrialRecord.load(study.trials[0]).best == history[1]


def test_a_queued_record_carries_its_seed_and_origin_to_the_trial_that_runs_it() -> None:
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 1.0}, user_attrs=TrialRecord(seed=3, first_number=9, retry_of=9).user_attrs())
    trial = study.ask()
    loaded = TrialRecord.load(trial)
    assert (loaded.seed, loaded.first_number, loaded.retry_of, loaded.reference) == (3, 9, 9, False)


def test_a_study_written_by_release_0_1_0_loads(v1_storage: str) -> None:
    logreg = optuna.load_study(study_name="logreg", storage=v1_storage)
    trials = logreg.get_trials(deepcopy=False)
    records = [TrialRecord.load(t) for t in trials]
    assert records[0].reference and all(not r.reference for r in records[1:])
    for trial, record in zip(trials, records):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            assert record.seed == trial.number and record.params["epochs"] == 3 and record.reason
            assert all(isinstance(m, EpochMetrics) for m in record.history) and record.history
        if trial.state == TrialState.COMPLETE:
            assert record.best.val_accuracy == trial.value and record.best.epoch == record.best_epoch
    interrupted, queued = trials[9], trials[10]
    assert interrupted.state == TrialState.FAIL and records[9].reason.startswith("interrupted after epoch 1")
    assert queued.state == TrialState.WAITING and (records[10].retry_of, records[10].seed) == (9, 9)
    result = BestResult.load(logreg)
    assert result.trial == 1 and result.test_images == 24 and result.latency_ms.keys() == {"batch_1", "batch_256"}
    assert result.provenance is None and result.bundle is None  # fields this release added
    assert BestResult.load(optuna.load_study(study_name="mlp", storage=v1_storage)) is None


def test_best_and_report_read_a_study_written_by_release_0_1_0(v1_storage: str, tmp_path: Path, capsys) -> None:
    from search.cli import main

    assert main(["best", "--model", "logreg", "--storage", v1_storage]) == 0
    out, err = capsys.readouterr()
    assert "already tested; printing the stored result" in err
    assert out.startswith("logreg: test accuracy 83.33%, test loss 4.4729 (trial #1, validation 87.50%, 3,076 parameters")
    assert main(["report", "--storage", v1_storage, "--out", str(tmp_path / "report"), "--format", "md,json,csv"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| 9 | interrupted |" in report and "| 10 | waiting |" in report and "(hand-found)" in report
    import json

    studies = json.loads((tmp_path / "report" / "report.json").read_text())["studies"]
    assert [len(s["trials"]) for s in studies] == [11, 4]
    assert studies[0]["best_result"]["test_accuracy"] == pytest.approx(0.8333, abs=1e-4)


def test_a_record_as_json_is_what_dataclasses_asdict_gives() -> None:
    """to_json copies no number or string (a report of 10,000 trials spent 9 s in asdict), and gives the same."""
    import dataclasses

    from search.records import RECORD_VERSION
    from search.training import EpochMetrics

    record = TrialRecord(seed=3, first_number=1, params={"lr": 0.01, "widths": (64, 32), "optimizer": "adam"},
                         worker="h:1", device="cpu", threads=2, trainable_parameters=10,
                         history=[EpochMetrics(e, 1.0, 0.5, 1.1, 0.4, 0.2) for e in (1, 2)], best_epoch=2,
                         reason="completed", seconds=1.5, provenance={"gpus": [{"name": "x"}], "threads": 2})
    assert record.to_json() == {"version": RECORD_VERSION, **dataclasses.asdict(record)}
    assert record.to_json()["params"] is not record.params and record.to_json()["history"][0] == {
        "epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4, "seconds": 0.2}

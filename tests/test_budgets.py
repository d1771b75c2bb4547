"""Wall-clock budgets, what each trial costs, and warm starts from an earlier study."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

import search.worker
from search.cli import main
from search.services.searching import SearchRequest, time_budget
from search.family import families, get_family
from search.space import choice, integer, real
from search.storage import open_storage
from search.studies import ENDED_ATTR, set_deadlines
from search.warmstart import fit_to_space
from search.worker import work
from search.records import TrialRecord

CPU = torch.device("cpu")


def _work(tiny_search, url: str) -> tuple[dict, list[str]]:
    lines: list[str] = []
    done = work(open_storage(url), ["logreg"], CPU, threading.Event(),
                data_overrides={"cache_dir": tiny_search.cache_dir}, log=lines.append)
    return done, lines


# --- the time budget ---------------------------------------------------------------------------------------


class Clock:
    """Stands in for the worker's `time` module: real time until `late_after` readings of the wall clock, then
    two hours later. The worker reads the wall clock once before it starts a trial and once per epoch."""

    def __init__(self, late_after: int) -> None:
        self.readings, self.late_after = 0, late_after
        self.perf_counter, self.sleep = time.perf_counter, time.sleep

    def time(self) -> float:
        self.readings += 1
        return time.time() + (7200.0 if self.readings > self.late_after else 0.0)


def test_a_deadline_stops_the_running_trial_at_its_next_epoch_as_a_result_and_starts_no_other(
        tiny_search, monkeypatch) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 50, "--param", "epochs=2000", "--pruner", "none")
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    set_deadlines([study], 3600.0, [1.0], time.time())
    monkeypatch.setattr(search.worker, "time", Clock(late_after=3))  # before the trial, epoch 1, epoch 2: on time
    done, lines = _work(tiny_search, url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 1 and trials[0].state == TrialState.COMPLETE  # a result at fewer epochs, not pruned
    history = TrialRecord.load(trials[0]).history
    assert [row.epoch for row in history] == [1, 2, 3]  # stopped at the first epoch boundary past the deadline
    assert trials[0].value == max(row.val_accuracy for row in history)
    assert TrialRecord.load(trials[0]).reason.startswith("time budget: stopped after epoch 3 of 2000")
    assert done == {"logreg": 1}
    assert study.user_attrs[ENDED_ATTR] == "time budget reached"
    assert any("time budget reached" in line for line in lines)


def test_best_retrains_a_trial_the_clock_stopped_and_says_so(tiny_search, monkeypatch, capsys) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 50, "--param", "epochs=40", "--pruner", "none")
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    set_deadlines([study], 3600.0, [1.0], time.time())
    monkeypatch.setattr(search.worker, "time", Clock(late_after=3))
    _work(tiny_search, url)
    (trial,) = study.get_trials(deepcopy=False)
    capsys.readouterr()
    assert main(["best", "--model", "logreg", "--storage", url, "--cache-dir", str(tiny_search.cache_dir),
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "was stopped by the time budget after epoch 3 of 40" in captured.err
    result = optuna.load_study(study_name="logreg", storage=open_storage(url)).user_attrs["best_result"]
    assert result["trial"] == trial.number and result["epochs"] == TrialRecord.load(trial).best_epoch <= 3
    assert result["retrained_val_accuracy"] == pytest.approx(trial.value)  # the same schedule, cut at the best epoch


def test_the_trial_budget_ends_a_search_before_a_distant_deadline(tiny_search) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    set_deadlines([study], 3600.0, [1.0], time.time())
    done, _ = _work(tiny_search, url)
    assert done == {"logreg": 2}
    assert study.user_attrs[ENDED_ATTR] == "trial budget met (2 finished)"


def test_deadlines_split_the_whole_budget_in_order_and_early_finishers_leave_time_to_the_next() -> None:
    storage = optuna.storages.InMemoryStorage()
    studies = [optuna.create_study(storage=storage, study_name=name) for name in ("a", "b", "c")]
    set_deadlines(studies, 100.0, [1.0, 1.0, 2.0], now=1000.0)
    assert [s.user_attrs["deadline"] for s in studies] == [1025.0, 1050.0, 1100.0]
    set_deadlines(studies, None, [1.0, 1.0, 2.0], now=1000.0)
    assert [s.user_attrs["deadline"] for s in studies] == [None, None, None]


def _request(run: bool = False, n_trials: int | None = None, budget: float | None = None) -> SearchRequest:
    """What `run` or `search` asks for with these budget flags (see search.commands.options.search_request)."""
    return SearchRequest(list(families()), n_trials=n_trials, time_budget=budget,
                         default_time_budget=run and n_trials is None)


def test_run_without_budget_flags_takes_each_models_time_for_the_device() -> None:
    names = list(families())
    seconds, weights = time_budget(_request(run=True), "cpu")
    assert weights == [get_family(n).time_budget["cpu"] for n in names]
    assert seconds == sum(weights)
    gpu_seconds, _ = time_budget(_request(run=True), "cuda")
    assert gpu_seconds < seconds  # a GPU gets through the same search sooner
    assert time_budget(_request(run=True, n_trials=10), "cpu")[0] is None  # a trial count alone: no clock
    assert time_budget(_request(), "cpu")[0] is None
    assert time_budget(_request(budget=120.0), "cpu")[0] == 120.0


def test_search_with_only_a_time_budget_has_no_trial_count_and_says_how_it_splits(tiny_search, capsys) -> None:
    url = tiny_search.sqlite_url
    before = time.time()
    assert main(["search", "--model", "logreg,mlp", "--workers", "0", "--storage", url, "--time-budget", "10m",
                 *tiny_search.data_args()]) == 0
    after = time.time()
    err = capsys.readouterr().err
    assert "time budget 10.0 min in all (--time-budget)" in err and "logreg" in err and "mlp" in err
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    assert study.user_attrs["settings"]["n_trials"] is None
    share = 600 * 180 / (180 + 600)  # logreg's default time against mlp's
    assert before + share <= study.user_attrs["deadline"] <= after + share


@pytest.mark.parametrize("text", ["soon", "0", "-5m", "1d"])
def test_a_bad_time_budget_is_one_line_and_exit_2(tiny_search, capsys, text: str) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse exits instead of returning
        main(["search", "--model", "logreg", "--workers", "0", "--storage", tiny_search.sqlite_url,
              f"--time-budget={text}", *tiny_search.data_args()])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--time-budget" in err and len(err.strip().splitlines()) == 1


# --- what each trial costs ---------------------------------------------------------------------------------


def test_every_trial_records_its_wall_seconds_and_device(tiny_search) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    _work(tiny_search, url)
    for trial in tiny_search.trials(url):
        assert TrialRecord.load(trial).device == "cpu"
        assert TrialRecord.load(trial).seconds > 0
        assert TrialRecord.load(trial).trainable_parameters == 3 * 16 * 16 * 4 + 4


# --- warm starts -------------------------------------------------------------------------------------------


def test_fitting_a_setting_to_another_space_drops_clips_and_moves_to_the_nearest_choice() -> None:
    dims = [integer("n_layers", 2, 3), integer("width_3", 8, 64, when=lambda p: p["n_layers"] >= 3),
            real("lr", 1e-4, 1e-2, log=True), choice("batch_size", 32, 64), choice("optimizer", "adam", "sgd")]
    fitted, notes = fit_to_space({"n_layers": 5, "width_3": 512, "lr": 0.1, "batch_size": 48, "optimizer": "rmsprop",
                                  "dropout": 0.1}, dims)
    assert fitted == {"n_layers": 3, "width_3": 64, "lr": 1e-2, "batch_size": 64}
    assert set(notes) == {"dropout dropped (not in this space)", "n_layers 5 -> 3 (clipped to 2..3)",
                          "width_3 512 -> 64 (clipped to 8..64)", "lr 0.1 -> 0.01 (clipped to 0.0001..0.01 (log))",
                          "batch_size 48 -> 64 (nearest choice)",
                          "optimizer dropped ('rmsprop' is not among {adam, sgd})"}
    narrow, _ = fit_to_space({"n_layers": 2, "width_3": 512}, dims)
    assert narrow == {"n_layers": 2}  # a 2-layer net has no third width


def test_a_warm_started_study_runs_the_earlier_studys_best_settings_first(tiny_search, tmp_path, capsys) -> None:
    earlier = f"sqlite:///{tmp_path / 'earlier.db'}"
    tiny_search.create(earlier, 4, "--pruner", "none")
    _work(tiny_search, earlier)
    ranked = sorted((t for t in tiny_search.trials(earlier) if t.state == TrialState.COMPLETE),
                    key=lambda t: (-t.value, t.number))
    url = tiny_search.sqlite_url
    assert main(["search", "--model", "logreg", "--workers", "0", "--n-trials", "3", "--storage", url,
                 "--param", "epochs=2", "--param", "lr=1e-4..1e-3", "--warm-start", f"{earlier}#logreg",
                 "--warm-start-k", "2", *tiny_search.data_args()]) == 0
    err = capsys.readouterr().err
    assert "warm start: queued the 2 best settings" in err
    queued = tiny_search.trials(url)
    assert [t.state for t in queued] == [TrialState.WAITING] * 2
    for trial, source in zip(queued, ranked):
        expected = {k: v for k, v in source.params.items()}
        expected["lr"] = min(max(expected["lr"], 1e-4), 1e-3)
        assert trial.system_attrs["fixed_params"] == expected
        assert TrialRecord.load(trial).warm_start.endswith(f"#logreg trial #{source.number}")
    if any(not 1e-4 <= t.params["lr"] <= 1e-3 for t in ranked[:2]):
        assert "lr" in err and "clipped" in err
    _work(tiny_search, url)
    first = tiny_search.trials(url)[:2]
    assert [t.params["optimizer"] for t in first] == [t.params["optimizer"] for t in ranked[:2]]


def test_a_warm_start_from_a_missing_storage_is_one_line(tiny_search, tmp_path, capsys) -> None:
    code = main(["search", "--model", "logreg", "--workers", "0", "--storage", tiny_search.sqlite_url,
                 "--warm-start", f"sqlite:///{tmp_path / 'nothing.db'}", *tiny_search.data_args()])
    err = capsys.readouterr().err
    assert code == 2 and "no storage file" in err and len(err.strip().splitlines()) == 1

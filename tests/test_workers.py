"""search/worker.py and search/launcher.py: workers in this process and as subprocesses, sharing one budget exactly.

Every study here is logreg on the tiny ImageFolder at 16px with 2-epoch trials (`tiny_search`), unless a test
needs trials long enough to interrupt one.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import weakref
from collections import Counter

import optuna
import pytest
import torch
from optuna.trial import TrialState

import search.trial
import search.worker
from search.launcher import plan_workers
from search.storage import open_storage
from search.worker import MAX_CONSECUTIVE_FAILURES, work
from search.records import TrialRecord

CPU = torch.device("cpu")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER_TIMEOUT_S = 240

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _work(tiny_search, url: str, stop: threading.Event | None = None) -> tuple[dict[str, int], list[str]]:
    lines: list[str] = []
    done = work(open_storage(url), ["logreg"], CPU, stop or threading.Event(),
                data_overrides={"cache_dir": tiny_search.cache_dir}, log=lines.append)
    return done, lines


def _states(trials) -> Counter:
    return Counter(t.state for t in trials)


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _finish(process, tiny_search, name: str = "worker", timeout: float = WORKER_TIMEOUT_S) -> str:
    """Wait for a worker subprocess; its exit code must be 0. Returns its output."""
    try:
        code = process.wait(timeout=timeout)
    except Exception:
        process.kill()
        pytest.fail(f"{name} did not exit in {timeout}s:\n{tiny_search.output(name)[-3000:]}")
    output = tiny_search.output(name)
    assert code == 0, f"{name} exited with {code}:\n{output[-3000:]}"
    return output


# --- in this process ---------------------------------------------------------------------------------------


def test_worker_finishes_exactly_the_budget_and_records_each_trial(tiny_search) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 5)
    done, lines = _work(tiny_search, url)
    trials = tiny_search.trials(url)
    assert done == {"logreg": 5}
    assert len(trials) == 5 and all(t.state in FINISHED for t in trials)
    for t in trials:
        assert isinstance(TrialRecord.load(t).seed, int)
        assert TrialRecord.load(t).reason
        history = TrialRecord.load(t).history
        assert [row.epoch for row in history] == list(range(1, len(history) + 1))
        assert 1 <= len(history) <= 2 and all(0 <= row.val_accuracy <= 1 for row in history)
        if t.state == TrialState.COMPLETE:
            assert t.value == max(row.val_accuracy for row in history)
            assert TrialRecord.load(t).reason.startswith("completed 2 epochs")
    assert len({TrialRecord.load(t).seed for t in trials}) == 5
    assert any("loading imagefolder at 16px" in line for line in lines)


def _counted_work(tiny_search, url: str) -> Counter:
    """Run a worker on `url`, counting the calls its own thread makes on the storage, by method."""
    from search.optuna_private import BaseHeartbeat

    storage = open_storage(url)
    calls: Counter = Counter()
    for name in {n for n in dir(optuna.storages.BaseStorage) + dir(BaseHeartbeat) if not n.startswith("__")}:
        method = getattr(storage, name, None)
        if callable(method):
            def counted(*args, __method=method, __name=name, **kwargs):
                if threading.current_thread() is threading.main_thread():  # not the heartbeat thread
                    calls[__name] += 1
                return __method(*args, **kwargs)

            setattr(storage, name, counted)
    work(storage, ["logreg"], CPU, threading.Event(), data_overrides={"cache_dir": tiny_search.cache_dir},
         log=lambda line: None)
    return calls


def test_each_epoch_writes_one_report_and_each_trial_a_fixed_number_of_writes(tiny_search, tmp_path) -> None:
    """Storage is written once per epoch (the validation accuracy), and per trial its record twice and a fixed
    number of Optuna's own writes, whatever the epochs; dead workers' trials are looked for once per heartbeat
    interval, not before every trial."""
    trials = 3
    writes = {}
    for epochs in (1, 3):
        url = f"sqlite:///{tmp_path / f'epochs-{epochs}.db'}"
        tiny_search.create(url, trials, "--param", f"epochs={epochs}", "--pruner", "none")
        calls = _counted_work(tiny_search, url)
        assert calls["set_trial_intermediate_value"] == trials * epochs
        assert calls["set_trial_user_attr"] == trials * 2  # the record when the trial starts and when it ends
        assert calls["_get_stale_trial_ids"] == 1  # the heartbeat interval (30 s) did not pass
        writes[epochs] = {name: n for name, n in calls.items()
                          if name.startswith(("set_", "create_", "delete_", "_set", "_create"))}
    per_epoch = {name: (writes[3].get(name, 0) - writes[1].get(name, 0)) / (trials * 2)
                 for name in writes[1].keys() | writes[3].keys()}
    assert {name: n for name, n in per_epoch.items() if n} == {"set_trial_intermediate_value": 1}


def test_worker_on_a_study_whose_budget_is_met_leaves_at_once(tiny_search) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    _work(tiny_search, url)
    done, lines = _work(tiny_search, url)
    assert done == {"logreg": 0} and lines == []  # not even the data are loaded, nor a trial waited for
    assert len(tiny_search.trials(url)) == 2


def test_a_queued_trial_in_the_last_free_slot_is_run_not_waited_for(tiny_search) -> None:
    """With --enqueue-reference and a budget of 1, the one slot is the queued (WAITING) reference trial."""
    url = tiny_search.sqlite_url
    tiny_search.create(url, 1, "--enqueue-reference")
    stop = threading.Event()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(done=_work(tiny_search, url, stop)[0]))
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        stop.set()
        thread.join()
        pytest.fail("the worker waited for the queued trial instead of running it")
    (trial,) = tiny_search.trials(url)
    assert result["done"] == {"logreg": 1}
    assert trial.state in FINISHED and TrialRecord.load(trial).reference is True
    assert trial.params["optimizer"] == "adam" and trial.params["lr"] == 1e-4


def test_diverged_trial_is_pruned_with_its_reason(tiny_search, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose outputs turn NaN: the loop raises Diverged, the worker prunes the trial and goes on."""
    prepare = search.trial.prepare

    def nan_model(*args, **kwargs):
        model, trained, source = prepare(*args, **kwargs)
        trained.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        return model, trained, source

    monkeypatch.setattr(search.trial, "prepare", nan_model)
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    done, _ = _work(tiny_search, url)
    trials = tiny_search.trials(url)
    assert done == {"logreg": 2}
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        assert TrialRecord.load(t).reason.startswith("diverged at epoch 1: training loss is nan")
        assert TrialRecord.load(t).history == []  # the diverged epoch is no result


def test_stop_during_training_requeues_the_trial_with_its_params_and_seed(tiny_search, monkeypatch) -> None:
    run_trial = search.worker.run_trial
    stop = threading.Event()

    def train_then_stop(*args, on_epoch, **kwargs):
        def stop_requested_now(metrics):
            stop.set()  # as SIGTERM would, in the middle of the run
            on_epoch(metrics)

        return run_trial(*args, on_epoch=stop_requested_now, **kwargs)

    monkeypatch.setattr(search.worker, "run_trial", train_then_stop)
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2, "--pruner", "none")
    done, lines = _work(tiny_search, url, stop)
    assert done == {"logreg": 0}
    interrupted, queued = tiny_search.trials(url)
    assert interrupted.state == TrialState.FAIL
    assert TrialRecord.load(interrupted).reason == "interrupted after epoch 1; queued again"
    assert queued.state == TrialState.WAITING
    assert queued.system_attrs["fixed_params"] == interrupted.params  # how Optuna queues a trial's params
    assert TrialRecord.load(queued).seed == TrialRecord.load(interrupted).seed
    assert TrialRecord.load(queued).retry_of == interrupted.number
    assert any("interrupted after epoch 1" in line for line in lines)
    from search.launcher import summary_records, summary_table
    from search.studies import counts_of

    counts = counts_of([interrupted, queued])
    assert (counts.failed, counts.interrupted, counts.waiting) == (0, 1, 1)  # a Ctrl-C is no failed setting
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    header, row, ended = summary_table(summary_records([study])).splitlines()
    assert dict(zip(header.split()[:7], row.split()[:7])) == {
        "study": "logreg", "finished": "0/2", "complete": "0", "pruned": "0", "failed": "0", "interrupted": "1",
        "queued": "1"}

    monkeypatch.setattr(search.worker, "run_trial", run_trial)
    done, _ = _work(tiny_search, url)  # the next worker runs the queued copy first, then the rest of the budget
    trials = tiny_search.trials(url)
    assert done == {"logreg": 2}
    assert [t.state for t in trials][0] == TrialState.FAIL and all(t.state in FINISHED for t in trials[1:])
    rerun = trials[1]
    assert rerun.params == interrupted.params and TrialRecord.load(rerun).seed == TrialRecord.load(interrupted).seed
    assert TrialRecord.load(rerun).first_number == interrupted.number


def test_worker_leaves_a_study_whose_trials_all_fail(tiny_search, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no model today")

    monkeypatch.setattr(search.trial, "prepare", broken)
    url = tiny_search.sqlite_url
    tiny_search.create(url, 5)
    done, lines = _work(tiny_search, url)
    trials = tiny_search.trials(url)
    assert done == {"logreg": 0}
    assert [t.state for t in trials] == [TrialState.FAIL] * MAX_CONSECUTIVE_FAILURES
    assert all(TrialRecord.load(t).reason == "failed: RuntimeError: no model today" for t in trials)
    assert "trials in a row failed" in lines[-1]


def test_out_of_memory_fails_the_trial_and_its_model_is_gone_when_the_memory_is_freed(tiny_search, monkeypatch) -> None:
    """Freed inside `except`, nothing was: its traceback holds the trial's frames, and with them the model, the
    optimizer state and the autograd graph, so `empty_cache` could give other workers on the GPU nothing back."""
    models: list = []
    prepare = search.trial.prepare

    def keeping_a_weak_reference(*args, **kwargs):
        model, trained, source = prepare(*args, **kwargs)
        models.append(weakref.ref(model))
        return model, trained, source

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    alive_when_freed: list[bool] = []
    free = search.worker.free_device_memory

    def recording() -> None:
        free()  # gc.collect(), then torch.cuda.empty_cache() where there is CUDA
        alive_when_freed.append(models[-1]() is not None)

    monkeypatch.setattr(search.trial, "prepare", keeping_a_weak_reference)
    monkeypatch.setattr(search.trial, "train_epoch", out_of_memory)
    monkeypatch.setattr(search.worker, "free_device_memory", recording)
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    _work(tiny_search, url)
    trials = tiny_search.trials(url)
    assert [t.state for t in trials] == [TrialState.FAIL] * MAX_CONSECUTIVE_FAILURES
    assert {TrialRecord.load(t).reason for t in trials} == {"out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert alive_when_freed == [False] * MAX_CONSECUTIVE_FAILURES


def test_a_hopeless_trial_is_pruned_at_an_early_epoch(tiny_search) -> None:
    """Four settings that learn, then two that barely can (a learning rate of 1e-5): the median pruner stops those."""
    url = tiny_search.sqlite_url
    tiny_search.create(url, 6, "--pruner", "median", "--param", "epochs=6")
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    learns = {"optimizer": "adam", "lr": 1e-2, "weight_decay": 1e-6, "batch_size": 32, "loss": "cross_entropy",
              "epochs": 6, "lr_schedule": "constant", "warmup_epochs": 0, "flip_p": 0.0, "max_rotation": 0.0}
    for _ in range(4):
        study.enqueue_trial(learns)
    for _ in range(2):
        study.enqueue_trial({**learns, "lr": 1e-5})
    done, _ = _work(tiny_search, url)
    trials = tiny_search.trials(url)
    assert done == {"logreg": 6}
    assert [t.state for t in trials[:4]] == [TrialState.COMPLETE] * 4
    for hopeless in trials[4:]:
        assert hopeless.state == TrialState.PRUNED
        assert re.fullmatch(r"pruned at epoch [1-5]: validation accuracy .*", TrialRecord.load(hopeless).reason)
        assert len(TrialRecord.load(hopeless).history) < 6  # it did not use its whole budget


@pytest.mark.parametrize("sampler, pruner, kinds", [
    ("random", "halving", (optuna.samplers.RandomSampler, optuna.pruners.SuccessiveHalvingPruner)),
    ("gp", "median", (optuna.samplers.GPSampler, optuna.pruners.MedianPruner)),
    ("tpe", "none", (optuna.samplers.TPESampler, optuna.pruners.NopPruner)),
])
def test_every_sampler_and_pruner_runs_a_study_to_its_budget(tiny_search, sampler: str, pruner: str, kinds) -> None:
    from search.studies import load_for_work

    url = tiny_search.sqlite_url
    tiny_search.create(url, 3, "--sampler", sampler, "--pruner", pruner)
    study, _ = load_for_work(open_storage(url), "logreg")
    assert (type(study.sampler), type(study.pruner)) == kinds
    done, _ = _work(tiny_search, url)
    assert done == {"logreg": 3}
    assert all(t.state in FINISHED for t in tiny_search.trials(url))


def test_a_search_with_other_data_settings_is_refused_and_changes_nothing(tiny_search, capsys) -> None:
    from search.cli import main

    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    before = optuna.load_study(study_name="logreg", storage=open_storage(url)).user_attrs["settings"]
    changed = [a if a != "16" else "24" for a in tiny_search.data_args()]  # --image-size 24
    code = main(["search", "--model", "logreg", "--workers", "0", "--storage", url, *changed])
    err = capsys.readouterr().err
    assert code == 2 and "was created with other data settings (image_size: 16 -> 24)" in err
    assert optuna.load_study(study_name="logreg", storage=open_storage(url)).user_attrs["settings"] == before


def test_cpu_workers_share_the_cores() -> None:
    slots = plan_workers("none", 1, 2)
    assert [s.device for s in slots] == ["cpu", "cpu"]
    assert all(s.visible_gpu is None and s.threads >= 1 for s in slots)
    assert plan_workers("none", 1, 0) == []


# --- worker subprocesses -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_workers_on_one_sqlite_file_share_the_budget_exactly(tiny_search) -> None:
    url, budget, workers = tiny_search.sqlite_url, 24, 8
    tiny_search.create(url, budget)
    processes = [tiny_search.start_worker(url, name=f"worker-{i}") for i in range(workers)]
    outputs = [_finish(p, tiny_search, f"worker-{i}") for i, p in enumerate(processes)]
    for output in outputs:
        assert "locked" not in output.lower()
        assert "Traceback" not in output
    trials = tiny_search.trials(url)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert _states(trials) == Counter({s: n for s, n in _states(trials).items() if s in FINISHED})
    assert sum(_states(trials)[s] for s in FINISHED) == budget
    reported = [int(m) for output in outputs for m in re.findall(r"worker finished: logreg (\d+) trial", output)]
    assert len(reported) == workers and sum(reported) == budget
    assert len({TrialRecord.load(t).seed for t in trials}) == budget  # no trial was run twice
    assert len({TrialRecord.load(t).worker for t in trials}) > 1  # the work was shared


def _running_mid_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """A RUNNING trial that has reported at least one epoch.

    The tests that signal a worker give trials 400 epochs (seconds, not the 0.2 s of 25 tiny epochs), so the
    signal lands mid-trial rather than after its last epoch, when finishing the trial is the right outcome.
    """
    running = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING and t.intermediate_values]
    return running[0] if running else None


HEARTBEAT = ("--heartbeat-interval", "1", "--grace-period", "3")


@pytest.mark.slow
def test_sigterm_stops_a_worker_after_its_epoch_and_leaves_no_trial_running(tiny_search) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2, "--param", "epochs=400", "--pruner", "none")
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    worker = tiny_search.start_worker(url, *HEARTBEAT)
    _wait_until(lambda: _running_mid_trial(study) is not None or worker.poll() is not None, 120,
                "a trial in the middle of its epochs")
    assert _running_mid_trial(study) is not None, tiny_search.output()
    worker.send_signal(signal.SIGTERM)
    output = _finish(worker, tiny_search, timeout=60)
    assert "SIGTERM received" in output and "worker finished: logreg 0 trial(s)" in output
    trials = tiny_search.trials(url)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert TrialRecord.load(trials[0]).reason.startswith("interrupted after epoch")
    assert trials[1].system_attrs["fixed_params"] == trials[0].params


@pytest.mark.slow
def test_search_launches_workers_and_prints_the_summary(tiny_search, tmp_path, capsys) -> None:
    from search.cli import main

    code = main(["search", "--model", "logreg", "--n-trials", "4", "--workers", "2", "--storage",
                 tiny_search.sqlite_url, "--param", "epochs=2", "--log-dir", str(tmp_path / "logs"),
                 *tiny_search.data_args()])
    captured = capsys.readouterr()
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("worker-*.log")))
    assert code == 0, captured.err + logs
    header, row, ended = captured.out.strip().splitlines()
    assert header.split()[:5] == ["study", "finished", "complete", "pruned", "failed"]
    assert row.split()[:2] == ["logreg", "4/4"]
    assert ended == "logreg ended: trial budget met (4 finished)"
    assert "starting 2 worker(s) on CPU" in captured.err
    assert len(list((tmp_path / "logs").glob("worker-*.log"))) == 2
    for log in (tmp_path / "logs").glob("worker-*.log"):  # a header per run, then lines with their time
        lines = log.read_text().strip().splitlines()
        assert re.match(r"===== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: worker [01] of 2 started by launcher pid \d+ on cpu",
                        lines[0])
        assert re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] worker finished: logreg \d trial\(s\)", lines[-1])
    assert sum(t.state in FINISHED for t in tiny_search.trials(tiny_search.sqlite_url)) == 4


def test_quiet_search_prints_its_summary_and_nothing_else_and_json_gives_it_as_values(tiny_search, tmp_path,
                                                                                       capsys) -> None:
    import json

    from search.cli import main

    code = main(["search", "--model", "logreg", "--n-trials", "2", "--workers", "1", "--storage",
                 tiny_search.sqlite_url, "--param", "epochs=1", "--log-dir", str(tmp_path / "logs"), "-q", "--json",
                 *tiny_search.data_args()])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""  # no progress, no "storage ..." or "starting ..." line
    (study,) = json.loads(out)["studies"]
    assert (study["study"], study["finished"], study["trial_budget"]) == ("logreg", 2, 2)
    assert 0 <= study["best_val_accuracy"] <= 1 and study["ended"] == "trial budget met (2 finished)"

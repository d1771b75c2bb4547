"""Storage faults: many processes creating one storage at the same instant; a journal whose worker died.

The creation race spawns its processes once; they meet at a barrier before each repetition, so every
repetition starts N `open_storage` calls on a storage that does not exist yet within microseconds.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.errors import UserError
from search.storage import exclusive_worker, open_storage
from search.records import TrialRecord

POSTGRES_ENV = "STL10_SEARCH_TEST_POSTGRES_URL"
REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 6
REPETITIONS = 10

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _open_create_ask(url: str) -> str:
    """What each racing process does: open the storage, create (or load) the study, ask a trial."""
    try:
        study = optuna.create_study(study_name="race", storage=open_storage(url), load_if_exists=True)
        study.ask()
        return "ok"
    except Exception as error:  # the outcome is the test's data: report it, do not die
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"


def _racer(urls: list[str], barrier, results) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for url in urls:
        barrier.wait(timeout=120)
        results.put((url, _open_create_ask(url)))


def _race(urls: list[str]) -> list[str]:
    """Each url opened by PROCESSES processes at once; returns the failures, one line each."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=_racer, args=(urls, barrier, results)) for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in range(PROCESSES * len(urls))]
    for process in processes:
        process.join(timeout=30)
    failures = [f"{url.rsplit('/', 1)[-1]}: {outcome}" for url, outcome in outcomes if outcome != "ok"]
    for url in urls:
        try:
            count = len(optuna.load_study(study_name="race", storage=open_storage(url)).get_trials(deepcopy=False))
        except Exception as error:
            count = f"no study ({type(error).__name__})"
        if count != PROCESSES:
            failures.append(f"{url.rsplit('/', 1)[-1]}: {count} trials, not {PROCESSES}")
    return failures


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_processes_creating_one_new_file_storage_at_once_all_succeed(tmp_path: Path, kind: str) -> None:
    if kind == "sqlite":
        urls = [f"sqlite:///{tmp_path / f'rep{i}.db'}" for i in range(REPETITIONS)]
    else:
        urls = [f"journal:{tmp_path / f'rep{i}.log'}" for i in range(REPETITIONS)]
    assert _race(urls) == []


@pytest.mark.slow
@pytest.mark.postgres
def test_processes_creating_one_new_postgres_storage_at_once_all_succeed() -> None:
    """A fresh schema per repetition (the test user owns the database, so it may create schemas)."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/postgres.sh starts a server)")
    schemas = [f"race_{uuid.uuid4().hex[:10]}" for _ in range(REPETITIONS)]
    admin = sqlalchemy.create_engine(base, poolclass=sqlalchemy.pool.NullPool)
    with admin.begin() as connection:
        for schema in schemas:
            connection.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    try:
        urls = [make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
                .render_as_string(hide_password=False) for schema in schemas]
        assert _race(urls) == []
    finally:
        with admin.begin() as connection:
            for schema in schemas:
                connection.execute(sqlalchemy.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_a_journal_worker_fails_and_queues_again_the_trial_a_killed_worker_left_running(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 'journal.log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    trial = study.ask()
    x = trial.suggest_float("x", 0.0, 1.0)
    TrialRecord(seed=7).save(trial)  # then its worker is killed: a journal has no heartbeat to notice
    storage = open_storage(url)
    with exclusive_worker(storage, ["s", "not-created-yet"]):
        trials = optuna.load_study(study_name="s", storage=storage).get_trials()
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
        assert trials[1].params == {"x": x}
        assert TrialRecord.load(trials[1]).seed == 7
        assert trials[1].system_attrs["failed_trial"] == 0
    assert len(optuna.load_study(study_name="s", storage=open_storage(url)).trials) == 2  # nothing more on exit


def test_a_second_worker_on_one_journal_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 'journal.log'}"
    optuna.create_study(study_name="s", storage=open_storage(url))
    code = ("import sys, time\n"
            "from search.storage import exclusive_worker, open_storage\n"
            "with exclusive_worker(open_storage(sys.argv[1]), ['s']):\n"
            "    print('holding', flush=True)\n"
            "    time.sleep(60)\n")
    first = subprocess.Popen([sys.executable, "-c", code, url], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match="one worker at a time") as caught:
            with exclusive_worker(open_storage(url), ["s"]):
                pass
        assert "SQLite" in str(caught.value) and "PostgreSQL" in str(caught.value)
    finally:
        first.kill()  # SIGKILL: no clean-up runs, the OS drops its lock
        first.wait()
    with exclusive_worker(open_storage(url), ["s"]):
        pass


def test_exclusive_worker_leaves_rdb_storages_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    study.ask()  # an RDB storage's heartbeat decides when a RUNNING trial is dead, not a lock
    with exclusive_worker(open_storage(url), ["s"]), exclusive_worker(open_storage(url), ["s"]):
        assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


# --- a worker's faults, per storage kind ---------------------------------------------------------------------
# Each search is logreg on the tiny ImageFolder at 16px (`tiny_search`); the signalled ones get 300-epoch trials,
# so the signal lands in the middle of a trial. PostgreSQL runs where .ci/postgres.sh started a server.

STORAGE_KINDS = ["sqlite", "journal", pytest.param("postgresql", marks=pytest.mark.postgres)]
HEARTBEAT = ("--heartbeat-interval", "1", "--grace-period", "3")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture
def kind_url(request, tiny_search) -> tuple[str, str]:
    """(url, study prefix) of a fresh storage of the parametrized kind; each PostgreSQL test gets its own prefix."""
    kind = request.param
    if kind == "sqlite":
        return tiny_search.sqlite_url, ""
    if kind == "journal":
        return f"journal:{tiny_search.folder / 'journal.log'}", ""
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/postgres.sh starts a server)")
    return os.environ[POSTGRES_ENV], f"t{uuid.uuid4().hex[:8]}-"


def _mid_trial(study: optuna.Study, epochs: int = 1) -> optuna.trial.FrozenTrial | None:
    running = [t for t in study.get_trials(deepcopy=False)
               if t.state == TrialState.RUNNING and len(t.intermediate_values) >= epochs]
    return running[0] if running else None


def _wait(condition, what: str, timeout: float = 180) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _finish(tiny_search, process, name: str, timeout: float = 240) -> str:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{name} did not exit:\n{tiny_search.output(name)[-3000:]}")
    assert code == 0, tiny_search.output(name)[-3000:]
    return tiny_search.output(name)


@pytest.mark.slow
@pytest.mark.parametrize("kind_url", STORAGE_KINDS, indirect=True)
def test_a_killed_worker_s_trial_is_run_again_and_the_budget_stays_exact(tiny_search, kind_url) -> None:
    """SQLite and PostgreSQL: the heartbeat of another worker notices; journal: the next worker to take its lock."""
    url, prefix = kind_url
    tiny_search.create(url, 2, "--param", "epochs=300", "--pruner", "none", "--study-prefix", prefix)
    study = optuna.load_study(study_name=f"{prefix}logreg", storage=open_storage(url))
    doomed = tiny_search.start_worker(url, *HEARTBEAT, "--study-prefix", prefix, "--pack", "2", name="doomed")
    _wait(lambda: _mid_trial(study) is not None or doomed.poll() is not None, "a trial in the middle of its epochs")
    victim = _mid_trial(study)
    assert victim is not None, tiny_search.output("doomed")
    doomed.kill()
    doomed.wait()

    _finish(tiny_search, tiny_search.start_worker(url, *HEARTBEAT, "--study-prefix", prefix, name="rescuer"),
            "rescuer")
    trials = study.get_trials(deepcopy=False)
    pack = TrialRecord.load(victim).pack_id  # the victim's pack (both trials) died with it, and runs again as one
    killed = [t for t in trials if t.number == victim.number
              or (pack is not None and TrialRecord.load(t).pack_id == pack and t.number < 2)]
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [t.number for t in killed]
    for dead in killed:
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
        assert retry.state in FINISHED and retry.params == dead.params
        assert TrialRecord.load(retry).seed == TrialRecord.load(dead).seed
        assert TrialRecord.load(retry).data_seed == TrialRecord.load(dead).data_seed
    assert sum(t.state in FINISHED for t in trials) == 2
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [pytest.param(False, marks=pytest.mark.extended, id="no-checkpoints"),
                                         pytest.param(True, id="checkpoints")])
@pytest.mark.parametrize("kind_url", STORAGE_KINDS, indirect=True)
def test_ctrl_c_mid_trial_queues_it_again_and_a_checkpoint_resumes_it(tiny_search, kind_url, checkpoints) -> None:
    import signal

    url, prefix = kind_url
    tiny_search.create(url, 1, "--param", "epochs=300", "--pruner", "none", "--study-prefix", prefix)
    study = optuna.load_study(study_name=f"{prefix}logreg", storage=open_storage(url))
    extra = ["--study-prefix", prefix, *(["--checkpoint-dir", str(tiny_search.folder / "ckpt")] if checkpoints else [])]
    worker = tiny_search.start_worker(url, *extra, name="first")
    _wait(lambda: _mid_trial(study, epochs=3) is not None or worker.poll() is not None, "three epochs of a trial")
    worker.send_signal(signal.SIGINT)
    output = _finish(tiny_search, worker, "first", timeout=60)
    assert "SIGINT received" in output and "worker finished: logreg 0 trial(s)" in output.replace(prefix, "")
    interrupted, queued = study.get_trials(deepcopy=False)
    assert interrupted.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert TrialRecord.load(interrupted).reason.startswith("interrupted after epoch")
    done_before = len(TrialRecord.load(interrupted).history)
    assert (tiny_search.folder / "ckpt").exists() == checkpoints

    _finish(tiny_search, tiny_search.start_worker(url, *extra, name="second"), "second")
    rerun = study.get_trials(deepcopy=False)[1]
    assert rerun.state == TrialState.COMPLETE and TrialRecord.load(rerun).seed == TrialRecord.load(interrupted).seed
    history = TrialRecord.load(rerun).history
    assert [row.epoch for row in history] == list(range(1, 301))
    if checkpoints:
        assert TrialRecord.load(rerun).resumed_after_epoch == done_before
        assert history[:done_before] == TrialRecord.load(interrupted).history  # the same epochs, not trained again
        assert not list((tiny_search.folder / "ckpt").rglob("*.pt"))  # deleted once the trial finished
    else:
        assert TrialRecord.load(rerun).resumed_after_epoch is None


def _copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "data"))


@pytest.mark.parametrize("change", ["rename a class", "add a class", "remove images"])
def test_a_dataset_changed_between_search_and_best_is_refused_in_one_line(tiny_search, tmp_path: Path, change: str,
                                                                         capsys) -> None:
    import shutil
    import threading

    import torch

    from search.cli import main
    from search.worker import work

    data = _copy_of(tiny_search.data_root, tmp_path)
    tiny_search.data_root = data
    url = tiny_search.sqlite_url
    tiny_search.create(url, 1)
    work(open_storage(url), ["logreg"], torch.device("cpu"), threading.Event(),
         data_overrides={"cache_dir": tiny_search.cache_dir}, log=lambda line: None)
    for part in ("train", "test"):
        if change == "rename a class":
            (data / part / "circle").rename(data / part / "ring")
        elif change == "add a class":
            shutil.copytree(data / part / "cross", data / part / "plus")
        else:
            for image in sorted((data / part / "cross").iterdir())[:2]:
                image.unlink()
    capsys.readouterr()
    code = main(["best", "--model", "logreg", "--storage", url, "--cache-dir", str(tiny_search.cache_dir)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("stl10-search: error: the dataset") and "changed since the study" in last
    assert "Traceback" not in err


def test_corrupt_and_unwritable_caches_cost_time_not_trials(tiny_search, tmp_path: Path, caplog) -> None:
    import threading

    import torch

    from search.worker import work

    url = tiny_search.sqlite_url
    tiny_search.create(url, 1, "--study-prefix", "corrupt-")
    tiny_search.create(url, 1, "--study-prefix", "blocked-")
    corrupted = list(tiny_search.cache_dir.glob("*.pt"))  # the decoded images the searches stored
    for cached in corrupted:
        cached.write_bytes(b"garbage, as a crash mid-write or a full disk leaves it")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    for study, cache_dir in (("corrupt-logreg", tiny_search.cache_dir), ("blocked-logreg", blocked / "cache")):
        done = work(open_storage(url), [study], torch.device("cpu"), threading.Event(),
                    data_overrides={"cache_dir": cache_dir}, log=lambda line: None)
        assert done == {study: 1}
        (trial,) = tiny_search.trials(url, study)
        assert trial.state in FINISHED
    assert corrupted and "rebuilding" in caplog.text.lower()
    assert "pass a writable --cache-dir" in caplog.text

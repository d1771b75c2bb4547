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
    trial.set_user_attr("seed", 7)  # then its worker is killed: a journal has no heartbeat to notice
    storage = open_storage(url)
    with exclusive_worker(storage, ["s", "not-created-yet"]):
        trials = optuna.load_study(study_name="s", storage=storage).get_trials()
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
        assert trials[1].params == {"x": x}
        assert trials[1].user_attrs == {"seed": 7}
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

"""Workers on PostgreSQL, each test with its SQLite twin: the same study, the same exact budget.

The PostgreSQL cases need a server: STL10_SEARCH_TEST_POSTGRES_URL=postgresql://user:password@host:port/db
(`.ci/postgres.sh` starts a throwaway one); without it they are skipped. Each test uses its own study prefix
and deletes its studies afterwards, so the database can be shared and reused.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.errors import UserError
from search.storage import budget_lock, open_storage
from search.records import TrialRecord

POSTGRES_ENV = "STL10_SEARCH_TEST_POSTGRES_URL"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/postgres.sh starts a server)")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage_url(request: pytest.FixtureRequest, tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}" if request.param == "sqlite" else _postgres_url()


@pytest.fixture
def prefix(storage_url: str):
    """A study prefix of this test alone; its studies are deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}-"
    yield prefix
    storage = open_storage(storage_url)
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name.startswith(prefix):
            optuna.delete_study(study_name=summary.study_name, storage=storage)


@pytest.mark.slow
def test_two_workers_finish_a_small_study_with_the_exact_budget(tiny_search, storage_url: str, prefix: str) -> None:
    budget = 6
    tiny_search.create(storage_url, budget, "--study-prefix", prefix)
    workers = [tiny_search.start_worker(storage_url, "--study-prefix", prefix, name=f"worker-{i}") for i in range(2)]
    for i, worker in enumerate(workers):
        try:
            code = worker.wait(timeout=240)
        except Exception:
            worker.kill()
            pytest.fail(f"worker-{i} did not exit:\n{tiny_search.output(f'worker-{i}')[-3000:]}")
        assert code == 0, tiny_search.output(f"worker-{i}")[-3000:]
        assert "Traceback" not in tiny_search.output(f"worker-{i}")
    trials = tiny_search.trials(storage_url, study=f"{prefix}logreg")
    states = Counter(t.state for t in trials)
    assert sum(states[s] for s in FINISHED) == budget
    assert set(states) <= set(FINISHED)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(TrialRecord.load(t).history and TrialRecord.load(t).reason for t in trials)


def test_budget_lock_admits_one_holder_at_a_time(storage_url: str, prefix: str) -> None:
    name = f"{prefix}logreg"
    events: list[str] = []
    first_holds = threading.Event()

    def second() -> None:
        first_holds.wait()
        with budget_lock(open_storage(storage_url), name):
            events.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with budget_lock(open_storage(storage_url), name):
        first_holds.set()
        time.sleep(0.5)
        events.append("first")
    thread.join(timeout=30)
    assert events == ["first", "second"]


@pytest.mark.postgres
def test_wrong_password_is_a_user_error_that_does_not_show_it() -> None:
    url = make_url(_postgres_url()).set(password="not-the-password-42")
    with pytest.raises(UserError, match="cannot open storage") as caught:
        open_storage(url.render_as_string(hide_password=False))
    assert "not-the-password-42" not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.postgres
def test_a_stale_trial_on_postgres_is_failed_and_queued_again() -> None:
    url = _postgres_url()
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    name = f"t{uuid.uuid4().hex[:10]}-stale"
    study = optuna.create_study(study_name=name, storage=storage)
    try:
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        storage.record_heartbeat(trial._trial_id)  # then the "worker" dies
        time.sleep(2.5)
        optuna.storages.fail_stale_trials(study)
        assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
        assert study.get_trials()[1].params == {"x": x}
    finally:
        optuna.delete_study(study_name=name, storage=storage)

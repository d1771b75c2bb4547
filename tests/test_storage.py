"""search/storage.py: one URL opens SQLite (WAL), PostgreSQL or a journal file; passwords never shown; locks and retries."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search.errors import UserError
from search.storage import budget_lock, open_storage, redact, with_retries

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_sqlite_storage_file_uses_wal_journal(tmp_path: Path) -> None:
    path = tmp_path / "studies.db"
    open_storage(f"sqlite:///{path}")
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_in_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path / 'no-such-folder' / 'studies.db'}")


def test_rdb_storage_runs_heartbeats_that_retry_stale_trials(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat_interval=1, grace_period=2)
    assert storage.get_heartbeat_interval() == 1
    assert isinstance(storage.get_heartbeat_stale_trial_callback(), RetryHeartbeatStaleTrialCallback)


def test_a_trial_without_heartbeat_past_the_grace_period_fails_and_is_queued_again(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    x = trial.suggest_float("x", 0.0, 1.0)
    storage.record_heartbeat(trial._trial_id)  # then the "worker" dies
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: TrialState.FAIL, 1: TrialState.WAITING}
    assert study.get_trials()[1].params == {"x": x}


@pytest.mark.parametrize("url", [
    "postgresql://u:secret@h/db",
    "postgresql+psycopg2://user:secret@db.example.org:5432/studies",
    "postgresql://u:se%40cret@h/db",
    "mysql://root:secret@127.0.0.1/optuna",
])
def test_redact_hides_the_password(url: str) -> None:
    shown = redact(url)
    assert "secret" not in shown and "se%40cret" not in shown
    assert "***" in shown


def test_redact_keeps_urls_without_password_and_names_malformed_ones() -> None:
    assert redact("sqlite:///studies.db") == "sqlite:///studies.db"
    assert redact("journal:/tmp/journal.log") == "journal:/tmp/journal.log"
    assert redact("::secret::") == "<malformed storage URL>"
    assert "secret" not in redact("postgresql://u:secret@h:notaport/db")


@pytest.mark.parametrize("url", ["not a url", "://secret@host", "postgresql://u:secret@h:notaport/db"])
def test_malformed_url_is_a_user_error_without_the_password(url: str) -> None:
    with pytest.raises(UserError, match="storage URL") as caught:
        open_storage(url)
    assert "secret" not in str(caught.value)


def test_unreachable_database_is_a_quick_user_error_without_the_password() -> None:
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        open_storage("postgresql://u:secret@127.0.0.1:1/db")  # nothing listens on port 1
    assert time.monotonic() - started < 15  # connect_timeout, not a TCP timeout of minutes
    message = str(caught.value)
    assert "secret" not in message
    assert "u:***@127.0.0.1:1/db" in message
    assert "\n" not in message


def test_unknown_database_driver_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no database driver") as caught:
        open_storage("nosuchdb://u:secret@h/db")
    assert "secret" not in str(caught.value)


def test_journal_storage_holds_a_small_study(tmp_path: Path) -> None:
    url = f"journal:{tmp_path / 'journal.log'}"
    study = optuna.create_study(study_name="quadratic", storage=open_storage(url))
    with budget_lock(study._storage, url, "quadratic"):
        study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=4)
    reopened = optuna.load_study(study_name="quadratic", storage=open_storage(url))
    assert [t.state for t in reopened.trials] == [TrialState.COMPLETE] * 4
    assert reopened.best_value == study.best_value


def test_journal_in_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_storage(f"journal:{tmp_path / 'missing' / 'journal.log'}")


def _locked() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("UPDATE trials", {}, sqlite3.OperationalError("database is locked"))


def test_with_retries_runs_again_while_the_database_is_locked() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _locked()
        return "done"

    assert with_retries(flaky) == "done"
    assert len(calls) == 3


def test_with_retries_gives_up_after_its_attempts_and_passes_other_errors_at_once() -> None:
    calls = []

    def always_locked() -> None:
        calls.append(1)
        raise _locked()

    with pytest.raises(sqlalchemy.exc.OperationalError):
        with_retries(always_locked, attempts=3)
    assert len(calls) == 3

    other = sqlalchemy.exc.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: trials"))
    calls.clear()

    def broken() -> None:
        calls.append(1)
        raise other

    with pytest.raises(sqlalchemy.exc.OperationalError, match="no such table"):
        with_retries(broken)
    assert len(calls) == 1

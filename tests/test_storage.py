"""search/storage.py: one URL opens SQLite (WAL), PostgreSQL or a journal file; passwords never shown; locks and retries.

The retry tests lock the SQLite file for real: another process holds its write lock (BEGIN IMMEDIATE and a
write) while the storage, opened with a short busy timeout, writes.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from search.errors import UserError
from search.storage import RetryingStorage, artifact_dir, budget_lock, open_storage, redact

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


@pytest.mark.parametrize("url", ["not a url", "://secret@host", "postgresql://u:secret@h:notaport/db"])
def test_malformed_url_is_a_user_error_without_the_password(url: str) -> None:
    with pytest.raises(UserError, match="storage URL") as caught:
        open_storage(url)
    assert "secret" not in str(caught.value)


def test_unreachable_database_is_a_quick_user_error_without_the_password(monkeypatch) -> None:
    engines = []
    create_engine = sqlalchemy.create_engine
    monkeypatch.setattr(sqlalchemy, "create_engine", lambda *a, **k: engines.append(k) or create_engine(*a, **k))
    with pytest.raises(UserError) as caught:
        open_storage("postgresql://u:secret@127.0.0.1:1/db")  # nothing listens on port 1
    assert engines and engines[0]["connect_args"]["connect_timeout"] == 10  # not a TCP timeout of minutes
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
    with budget_lock(study._storage, "quadratic"):
        study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=4)
    reopened = optuna.load_study(study_name="quadratic", storage=open_storage(url))
    assert [t.state for t in reopened.trials] == [TrialState.COMPLETE] * 4
    assert reopened.best_value == study.best_value


def test_journal_in_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_storage(f"journal:{tmp_path / 'missing' / 'journal.log'}")


def _hold_write_lock(path: Path, seconds: float | None) -> subprocess.Popen:
    """Another process takes the SQLite file's one write lock for `seconds` (None: until its stdin closes);
    returns once it holds it."""
    code = ("import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "c.execute('UPDATE studies SET study_name = study_name')\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2])) if sys.argv[2] != 'None' else sys.stdin.read()\n"
            "c.execute('COMMIT')\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _count_calls(storage: RetryingStorage, name: str) -> list:
    """Each call that reaches the inner storage's method `name` appends to the returned list."""
    calls: list = []
    method = getattr(storage.inner, name)
    setattr(storage.inner, name, lambda *a, **k: calls.append(1) or method(*a, **k))
    return calls


def test_a_write_waits_out_another_process_holding_the_sqlite_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "studies.db"
    storage = open_storage(f"sqlite:///{path}", busy_timeout=0.1)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    holder = _hold_write_lock(path, 1.5)
    started = time.monotonic()
    study.set_user_attr("written", True)  # SQLite gives up after 0.1 s with "database is locked"; tried again
    waited = time.monotonic() - started
    study.tell(trial, 0.5)
    holder.wait(timeout=10)
    assert waited > 1.0  # it did wait for the lock
    reopened = optuna.load_study(study_name="s", storage=open_storage(f"sqlite:///{path}"))
    assert [t.state for t in reopened.trials] == [TrialState.COMPLETE]
    assert reopened.user_attrs == {"written": True}


def test_a_lock_held_past_the_retry_bound_raises_the_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "studies.db"
    storage = open_storage(f"sqlite:///{path}", busy_timeout=0.1, retry_seconds=0.5)
    study = optuna.create_study(study_name="s", storage=storage)
    calls = _count_calls(storage, "set_study_user_attr")
    holder = _hold_write_lock(path, None)  # holds the lock until told
    with pytest.raises(optuna.exceptions.StorageInternalError) as caught:
        study.set_user_attr("k", 1)
    assert holder.poll() is None  # raised while the lock was still held: the retry bound ended it
    assert len(calls) >= 2  # tried again before giving up
    assert "database is locked" in str(caught.value.__cause__)
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0


def test_an_error_that_waiting_cannot_cure_is_raised_at_once(tmp_path: Path) -> None:
    path = tmp_path / "studies.db"
    study = optuna.create_study(study_name="s", storage=open_storage(f"sqlite:///{path}"))
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE study_user_attributes")
    calls = _count_calls(study._storage, "set_study_user_attr")
    with pytest.raises(optuna.exceptions.StorageInternalError) as caught:
        study.set_user_attr("k", 1)
    assert len(calls) == 1  # not tried again for the retry bound of a minute
    assert "no such table" in str(caught.value.__cause__)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_the_storage_is_one_object_that_knows_what_lies_behind_it(tmp_path: Path, kind: str) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'journal.log'}"
    storage = open_storage(url)
    assert isinstance(storage, (RetryingStorage, BaseStorage, BaseHeartbeat))
    assert storage.kind == kind
    assert storage.storage_file == tmp_path / ("studies.db" if kind == "sqlite" else "journal.log")
    assert (storage.engine is not None) == (kind == "sqlite")
    assert (storage.get_heartbeat_interval() is not None) == (kind == "sqlite")
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.25})
    trial = study.ask()
    study.tell(trial, trial.suggest_float("x", 0, 1))
    optuna.storages.fail_stale_trials(study)
    assert study.best_value == 0.25 and study._storage is storage


@pytest.mark.parametrize("url, secrets", [
    ("postgresql://u:secret@h/db", ["secret"]),
    ("postgresql+psycopg2://user:secret@db.example.org:5432/studies", ["secret"]),
    ("postgresql://u:se%40cret@h/db", ["se%40cret", "cret"]),
    ("mysql://root:secret@127.0.0.1/optuna", ["secret"]),
    ("postgresql://u:p@ss@host/db", ["p@ss", "ss@"]),
    ("postgresql://u:p@ss@w@rd@host:5432/db", ["p@ss", "w@rd", "ss@w"]),
    ("postgresql://u:pa/ss@host/db", ["pa/ss", "ss@"]),
    ("postgresql://u:pa?ss@host/db", ["pa?ss"]),
    ("postgresql://u@h/db?password=hunter2", ["hunter2"]),
    ("postgresql://u@h/db?sslmode=require&PASSWORD=hunter2&application_name=x", ["hunter2"]),
    ("postgresql://h/db?user=u&passwd=hunter2", ["hunter2"]),
    ("postgresql://h/db?pwd=hunter2;sslpassword=keypass", ["hunter2", "keypass"]),
    ("postgresql://h/db?Secret=s3&token=t0k&api_key=k3y&sslkey=/k.pem", ["s3", "t0k", "k3y"]),
    ("postgresql://h/db?pass%77ord=hunter2", ["hunter2"]),
    ("mysql+pymysql://:onlypass@h/db", ["onlypass"]),
    ("redis://:secret@localhost:6379/0", ["secret"]),
    ("anything+driver://user:secret@[::1]:5432/db?x=1#frag", ["secret"]),
    ("postgresql://u:secret@h:notaport/db", ["secret"]),
])
def test_redact_hides_every_credential(url: str, secrets: list[str]) -> None:
    shown = redact(url)
    for secret in secrets:
        assert secret not in shown
    assert "***" in shown


@pytest.mark.parametrize("url, shown", [
    ("sqlite:///studies.db", "sqlite:///studies.db"),
    ("sqlite:////tmp/a@b/studies.db", "sqlite:////tmp/a@b/studies.db"),
    ("journal:/tmp/journal.log", "journal:/tmp/journal.log"),
    ("postgresql://search:pw@db-host:5432/studies", "postgresql://search:***@db-host:5432/studies"),
    ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
    ("postgresql://u@h/db?sslmode=require&password=pw", "postgresql://u@h/db?sslmode=require&password=***"),
    ("postgresql://u@h/db?options=-csearch_path%3Dx", "postgresql://u@h/db?options=-csearch_path%3Dx"),
    ("postgresql://h/db?application_name=a@b", "postgresql://h/db?application_name=a@b"),
    ("::secret::", "<malformed storage URL>"),
    ("not a url", "<malformed storage URL>"),
    ("://secret@host", "<malformed storage URL>"),
])
def test_redact_keeps_the_rest_readable(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_artifacts_live_beside_a_file_storage_or_in_one_per_user_folder_per_server(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("STL10_SEARCH_ARTIFACTS", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert artifact_dir(f"sqlite:///{tmp_path}/studies.db") == tmp_path / "artifacts"
    assert artifact_dir(f"journal:{tmp_path}/journal.log") == tmp_path / "artifacts"
    server = artifact_dir("postgresql://search:secret@db-host/studies")
    assert server == tmp_path / "data" / "stl10-search" / "artifacts" / "db-host-5432-studies"
    assert artifact_dir("postgresql+psycopg://other:pw2@db-host:5432/studies?sslmode=require") == server
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert artifact_dir("postgresql://search:secret@db-host/studies") == server  # not ./artifacts
    monkeypatch.setenv("STL10_SEARCH_ARTIFACTS", str(tmp_path / "env"))
    assert artifact_dir("postgresql://search:secret@db-host/studies") == tmp_path / "env"
    assert artifact_dir(f"sqlite:///{tmp_path}/studies.db", tmp_path / "flag") == tmp_path / "flag"

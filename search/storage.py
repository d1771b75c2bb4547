"""The one place that opens storage: SQLite by default, any SQLAlchemy URL (PostgreSQL), or a journal file.

SQLite holds many worker processes on one machine with WAL journaling and a long busy timeout; every
RDB storage runs heartbeats so that a trial whose worker died is failed and queued again.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url

from search.errors import UserError

DEFAULT_STORAGE = "sqlite:///studies.db"
SQLITE_BUSY_TIMEOUT_S = 120
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120
MAX_RETRIES = 3
T = TypeVar("T")


def redact(url: str) -> str:
    """The URL with any password replaced by ***, safe to print or log."""
    if url.startswith("journal:"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return "<malformed storage URL>"


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def journal_path(url: str) -> Path | None:
    return Path(url.removeprefix("journal:")) if url.startswith("journal:") else None


def storage_file(url: str) -> Path | None:
    """The file behind a SQLite or journal URL; None for a database server (or a URL open_storage will reject)."""
    path = journal_path(url)
    if path is not None:
        return path
    try:
        return sqlite_path(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None


def _prepare_sqlite(path: Path) -> None:
    """WAL lets readers and one writer work at once; it is a property of the file, set once."""
    if path.parent and not path.parent.exists():
        raise UserError(f"folder {path.parent} for the SQLite storage does not exist")
    with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def open_storage(
    url: str = DEFAULT_STORAGE,
    *,
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
    grace_period: int = GRACE_PERIOD_S,
) -> optuna.storages.BaseStorage:
    """Storage for `url`: "sqlite:///studies.db", "postgresql://user:pw@host/db", "journal:PATH".

    A malformed URL, a missing driver or an unreachable database is a UserError naming the (redacted) URL.
    """
    path = journal_path(url)
    if path is not None:
        if not path.parent.exists():
            raise UserError(f"folder {path.parent} for the journal storage does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise UserError(f"malformed storage URL {redact(url)!r}; expected e.g. {DEFAULT_STORAGE}, "
                        "postgresql://user:password@host/db or journal:PATH") from None
    engine_kwargs: dict = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
        db_path = sqlite_path(url)
        if db_path is not None:
            _prepare_sqlite(db_path)
    elif parsed.get_backend_name().startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        storage = RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )
    except (sqlalchemy.exc.NoSuchModuleError, ModuleNotFoundError, ImportError) as error:
        raise UserError(f"no database driver for {redact(url)} ({error}); for PostgreSQL: "
                        "pip install 'stl10-search[postgres]'") from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UserError(f"cannot open storage {redact(url)}: {reason}") from None
    if parsed.get_backend_name() == "sqlite":
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # connections made so far lack the pragma
    return storage


def _sqlite_pragmas(connection, _record) -> None:
    """WAL with synchronous=NORMAL: a commit no longer waits for fsync; the file cannot be corrupted by a crash."""
    connection.execute("PRAGMA synchronous=NORMAL")


def is_locked_error(error: BaseException) -> bool:
    return isinstance(error, sqlalchemy.exc.OperationalError) and "locked" in str(error).lower()


def with_retries(operation: Callable[[], T], attempts: int = 8) -> T:
    """Run a storage operation again when SQLite says "database is locked" despite the busy timeout."""
    for attempt in range(attempts):
        try:
            return operation()
        except sqlalchemy.exc.OperationalError as error:
            if not is_locked_error(error) or attempt == attempts - 1:
                raise
            time.sleep(min(0.05 * 2**attempt, 2.0))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def budget_lock(storage: optuna.storages.BaseStorage, url: str, study_name: str) -> Iterator[None]:
    """A lock across processes (and hosts, for PostgreSQL) around "count trials, then start one".

    Without it two workers can both see one free slot and both start a trial, and the budget overshoots.
    """
    lock_file = storage_file(url)
    if lock_file is not None:
        from filelock import FileLock

        with FileLock(str(lock_file) + f".{study_name}.lock", timeout=SQLITE_BUSY_TIMEOUT_S):
            yield
        return
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
        key = int(hashlib.sha1(study_name.encode()).hexdigest()[:15], 16)
        with storage.engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
        return
    yield  # other databases: best effort, the budget may overshoot by up to one trial per worker

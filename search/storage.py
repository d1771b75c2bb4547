"""The one place that opens storage: SQLite by default, any SQLAlchemy URL (PostgreSQL), or a journal file.

Every caller gets a RetryingStorage: Optuna's storage for the URL, whose calls are run again when the database
is briefly unavailable. SQLite holds many worker processes on one machine with WAL journaling and a busy
timeout; every RDB storage runs heartbeats so that a trial whose worker died is failed and queued again. A
journal file has no heartbeats, so it takes one worker at a time (`exclusive_worker`).

The storage's own faults are one line each (StorageUnavailable), at opening and at any later call: a damaged
file (SQLite's quick_check at opening, a journal's replay), a read-only file or mount (opened with
`read_only=True` it serves reading commands without a lock file, WAL pragma or heartbeat), a full disk
(SQLite rolls the write back; a journal is cut back to its last whole record).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import errno
import hashlib
import json
import os
import random
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import quote, unquote

import optuna
import sqlalchemy
from filelock import FileLock, Timeout
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from search.environment import ARTIFACTS_ENV, DEFAULT_STORAGE  # noqa: F401 - DEFAULT_STORAGE re-exported
from search.errors import StorageReadOnly, StorageUnavailable, UserError
from search.optuna_private import BaseHeartbeat, get_lock_file
from search.rdb_reads import FastReadRDBStorage, latest_and_best

SQLITE_BUSY_TIMEOUT_S = 120
LOCK_TIMEOUT_S = 120  # how long a process waits for another to finish creating a storage or starting a trial
LOCK_POLL_S = 0.002  # how often a process waiting for a lock file looks again
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120
MAX_RETRIES = 3
RETRY_SECONDS = 60.0  # how long a storage call is tried again before its error is raised
CREATION_LOCK_KEY = 0x5354_4C31_3053  # PostgreSQL advisory lock held while a process creates Optuna's tables
T = TypeVar("T")

# Driver messages of a database that is busy or briefly away, as opposed to a query that can never succeed.
_TRANSIENT_MESSAGES = ("locked", "could not connect", "connection refused", "server closed the connection",
                       "connection is closed", "connection is lost", "terminating connection", "the database system is",
                       "deadlock detected", "could not serialize", "timeout expired")
# SQLite's primary result codes and PostgreSQL's SQLSTATEs of a storage that cannot be used as it stands.
SQLITE_READONLY, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 8, 11, 13, 14, 26
_POSTGRES_FAULTS = {"53100": "full", "XX001": "damaged", "XX002": "damaged", "25006": "read-only"}
_OS_FAULTS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read-only", errno.EACCES: "read-only",
              errno.EPERM: "read-only"}
# Query parameters whose value is a credential: password, passwd, sslpassword, pwd, secret, token, api_key, ...
_SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with every credential replaced by ***, safe to print or log.

    Hidden: the password of the user info (up to the last '@' before the host, as a password may hold '@'),
    and the value of every query parameter named like a credential (password=, sslpassword=, token=, ...).
    """
    if url.startswith("journal:"):
        return url
    scheme, separator, rest = url.partition("://")
    if not separator or not re.fullmatch(r"[A-Za-z][\w+.-]*", scheme):
        return "<malformed storage URL>"
    first_at = rest.find("@")
    if first_at != -1 and "/" not in rest[:first_at].partition(":")[0]:  # a user name holds no '/'
        end = re.search(r"[/?#]", rest[first_at:])
        last_at = rest.rfind("@", 0, first_at + end.start() if end else len(rest))
        user, colon, _ = rest[:last_at].partition(":")
        rest = f"{user}{':***' if colon else ''}@{rest[last_at + 1:]}"
    head, question, query = rest.partition("?")
    if question:
        query, hash_mark, fragment = query.partition("#")
        parameters = [_redact_parameter(p) for p in re.split(r"([&;])", query)]
        rest = f"{head}?{''.join(parameters)}{hash_mark}{fragment}"
    return f"{scheme}://{rest}"


def _redact_parameter(parameter: str) -> str:
    name, equals, _ = parameter.partition("=")
    return f"{name}=***" if equals and _SECRET_PARAMETER.search(unquote(name)) else parameter


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


def storage_kind(url: str) -> str:
    """"journal", "sqlite", "postgresql", another SQLAlchemy backend's name, or "" for a malformed URL."""
    if url.startswith("journal:"):
        return "journal"
    try:
        return make_url(url).get_backend_name()
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return ""


def artifact_dir(url: str, override: Path | None = None) -> Path:
    """Where the weights of `best` go and where `dashboard` reads them, the same from any folder.

    --artifacts, else $STL10_SEARCH_ARTIFACTS, else "artifacts" beside a SQLite or journal file, else (a
    database server) $XDG_DATA_HOME/stl10-search/artifacts/HOST-PORT-DATABASE (~/.local/share by default).
    """
    if override is not None:
        return Path(override)
    if os.environ.get(ARTIFACTS_ENV):
        return Path(os.environ[ARTIFACTS_ENV])
    path = storage_file(url)
    if path is not None:
        return path.parent / "artifacts"
    parsed = make_url(url)
    host = parsed.host or parsed.query.get("host") or "localhost"
    port = parsed.port or {"postgresql": 5432, "mysql": 3306}.get(parsed.get_backend_name(), "")
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{host}-{port}-{parsed.database or ''}")
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "stl10-search" / "artifacts" / key


def is_transient(error: BaseException) -> bool:
    """A database busy or briefly away ("database is locked", a lost connection), seen raw or through Optuna.

    Optuna's RDBStorage raises StorageInternalError with the driver's OperationalError as its cause.
    """
    if isinstance(error, optuna.exceptions.StorageInternalError):
        error = error.__cause__
    if not isinstance(error, sqlalchemy.exc.OperationalError):
        return False
    message = str(error).lower()
    return error.connection_invalidated or any(text in message for text in _TRANSIENT_MESSAGES)


def storage_fault(error: BaseException, kind: str, path: Path | None, shown: str) -> StorageUnavailable | None:
    """A fault of the storage itself behind `error` (damaged, read-only, full) as one line saying what to do;
    None for any other error. `kind`, `path` and `shown` (the redacted URL) say which storage it is.

    Optuna raises StorageInternalError with the driver's error as cause; SQLite's result code, PostgreSQL's
    SQLSTATE and a journal file's OSError or unreadable line tell the fault, not the wording of a message.
    """
    if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.orig is not None:
        error = error.orig
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    fault = None
    if isinstance(error, sqlite3.Error):
        fault = {SQLITE_CORRUPT: "damaged", SQLITE_NOTADB: "damaged", SQLITE_FULL: "full",
                 SQLITE_READONLY: "read-only"}.get((getattr(error, "sqlite_errorcode", None) or 0) & 0xFF)
    elif getattr(error, "pgcode", None) or getattr(error, "sqlstate", None):  # psycopg2, psycopg 3
        fault = _POSTGRES_FAULTS.get(getattr(error, "pgcode", None) or getattr(error, "sqlstate", None))
    elif kind == "journal" and isinstance(error, OSError):
        fault, reason = _OS_FAULTS.get(error.errno), error.strerror or reason
    elif kind == "journal" and isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        fault = "damaged"  # a line of the journal that is not a record: Optuna's replay stops there
    return None if fault is None else storage_error(fault, kind, path, shown, reason)


def storage_error(fault: str, kind: str, path: Path | None, shown: str, reason: str) -> StorageUnavailable:
    """The one line for a storage that is "damaged", "read-only" or "full", and what to do about it."""
    error = StorageReadOnly if fault == "read-only" else StorageUnavailable
    return error(_fault_message(fault, kind, path, shown, reason))


def _fault_message(fault: str, kind: str, path: Path | None, shown: str, reason: str) -> str:
    where = f"storage file {path}" if path is not None else f"storage {shown}"
    other = {"sqlite": "--storage sqlite:///OTHER.db", "journal": "--storage journal:OTHER.log"}.get(kind)
    if fault == "damaged":
        return (f"{where} is damaged ({reason}); restore it from a backup, or start a new one with "
                + (other or "--storage and a new database"))
    if fault == "read-only":
        return (f"{where} is read-only ({reason}); report, dashboard and best (printing stored results) can read "
                "it, but this command writes: "
                + (f"copy it to a writable folder and pass {other.replace('OTHER', 'COPY')}" if other
                   else "connect as a database user that may write"))
    return (f"{where}: no space left on device ({reason}); what was stored before is intact: free some space "
            "there, or move the storage, and run the command again")


class RetryingStorage(BaseStorage, BaseHeartbeat):
    """Optuna's storage for one URL, each call run again while the database is busy or away, up to a bound.

    One locked moment of SQLite or one restart of PostgreSQL must not fail a trial that trained for an hour,
    and a retry at every call site is a retry forgotten at some: so the storage retries, with exponential
    backoff for up to `retry_seconds`, then raises the error. A fault of the storage itself (damaged, read-only,
    full) is raised at once as a StorageUnavailable. It also tells callers what lies behind it: `kind`,
    `storage_file` (SQLite and journal), `engine` (RDB storages, for PostgreSQL advisory locks) and `read_only`.
    """

    def __init__(self, inner: BaseStorage, url: str, *, rdb: RDBStorage | None = None,
                 retry_seconds: float = RETRY_SECONDS, read_only: bool = False) -> None:
        self.inner, self.retry_seconds, self.read_only = inner, retry_seconds, read_only
        self.shown = redact(url)  # the URL itself is not kept: it may hold a password
        self.kind = storage_kind(url)
        self.storage_file = storage_file(url)
        self.engine: sqlalchemy.engine.Engine | None = rdb.engine if rdb is not None else None
        self._fast_reads = rdb if isinstance(rdb, FastReadRDBStorage) else None

    def read_only_error(self, why: str) -> StorageReadOnly:
        """The refusal of a write to a storage opened read-only; `why` says what would have written."""
        return storage_error("read-only", self.kind, self.storage_file, self.shown, why)

    def _retry(self, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                return operation(*args, **kwargs)
            except Exception as error:
                fault = storage_fault(error, self.kind, self.storage_file, self.shown)
                if fault is not None:
                    raise fault from error
                if not is_transient(error) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: workers that collided do not collide again
            delay = min(delay * 2, 5.0)

    def latest_and_best_trials(self, study_id: int, latest: int, best: int) -> list[FrozenTrial]:
        """The study's `latest` trials of highest number and its `best` completed ones of highest value (the
        earliest on a tie), in number order: from an RDB storage without reading the rest of the study."""
        if self._fast_reads is not None:
            return self._retry(self._fast_reads.latest_and_best_trials, study_id, latest, best)
        return latest_and_best(self.get_all_trials(study_id, deepcopy=False), latest, best)

    # Heartbeats: a journal file has none (so its trials are guarded by `exclusive_worker` instead).
    def record_heartbeat(self, trial_id: int) -> None:
        if isinstance(self.inner, BaseHeartbeat):
            self._retry(self.inner.record_heartbeat, trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if isinstance(self.inner, BaseHeartbeat):
            return self._retry(self.inner._get_stale_trial_ids, study_id)
        return []

    def get_heartbeat_interval(self) -> int | None:
        return self.inner.get_heartbeat_interval() if isinstance(self.inner, BaseHeartbeat) else None

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.inner.get_heartbeat_stale_trial_callback() if isinstance(self.inner, BaseHeartbeat) else None


def _retried(name: str) -> Callable[..., Any]:
    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retry(getattr(self.inner, name), *args, **kwargs)

    method.__name__, method.__qualname__ = name, f"RetryingStorage.{name}"
    method.__doc__ = getattr(BaseStorage, name).__doc__
    return method


# Every public method of BaseStorage, from create_new_study to check_trial_is_updatable, goes to the inner storage.
for _name in [n for n, value in vars(BaseStorage).items() if callable(value) and not n.startswith("_")]:
    setattr(RetryingStorage, _name, _retried(_name))
abc.update_abstractmethods(RetryingStorage)


def _prepare_sqlite(path: Path, busy_timeout: float) -> None:
    """WAL lets readers and one writer work at once; it is a property of the file, set once."""
    with contextlib.closing(sqlite3.connect(path, timeout=busy_timeout)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def _sqlite_reader(path: Path, busy_timeout: float) -> Callable[[], sqlite3.Connection]:
    """A maker of connections that only read `path`, for a file this process may not write.

    mode=ro, or immutable=1 where reading a WAL file fails because its folder cannot take the -shm file
    (a read-only mount; nothing can change the file there either). The path is percent-encoded into the URI,
    so spaces, '?', '#' and bytes that are not UTF-8 stay part of it.
    """
    base = "file:" + quote(os.fsencode(path.absolute()))
    for query in ("mode=ro", "immutable=1"):
        uri = f"{base}?{query}"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout)) as probe:
                probe.execute("SELECT count(*) FROM sqlite_master").fetchone()
            break
        except sqlite3.OperationalError as error:  # SQLITE_CANTOPEN, or SQLITE_READONLY_DIRECTORY: no -shm file
            if query == "immutable=1" or error.sqlite_errorcode & 0xFF not in (SQLITE_CANTOPEN, SQLITE_READONLY):
                raise
    return lambda: sqlite3.connect(uri, uri=True, timeout=busy_timeout, check_same_thread=False)


def _check_sqlite(connect: Callable[[], sqlite3.Connection], path: Path) -> None:
    """Refuse a damaged file at opening, not at some later query with Optuna's misleading "exceeding max length".

    PRAGMA quick_check reads every page once: 0.08 s for a 95 MB file of 10,000 trials in the page cache,
    1.8 s from disk, where loading those trials takes 22 s.
    """
    with contextlib.closing(connect()) as connection:
        problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        reason = " ".join(" ".join(problems[:2]).replace("*** in database main ***", "").split())
        raise storage_error("damaged", "sqlite", path, str(path), reason)


def _refuse_unwritable(path: Path, kind: str) -> None:
    """A writing command on a file, or in a folder, this process may not write: one line, nothing created there.

    Checked before any lock file, as root writes past file permissions but not past a read-only mount.
    """
    for target in ([path] if path.exists() else []) + [path.parent]:
        if not os.access(target, os.W_OK):
            read_only_mount = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
            reason = os.strerror(errno.EROFS if read_only_mount else errno.EACCES)
            if not path.exists():
                scheme = "sqlite:///" if kind == "sqlite" else "journal:"
                raise UserError(f"cannot create storage file {path}: its folder is read-only ({reason}); pass "
                                f"--storage {scheme}PATH in a writable folder")
            raise storage_error("read-only", kind, path, str(path),
                                reason if target == path else f"its folder: {reason}")


def _refuse_plain_path(url: str) -> None:
    """"studies.db" or "/data/x.db" as --storage: say which URL was meant instead of "malformed"."""
    if url.startswith("journal:") or "://" in url or "@" in url:  # an '@' may start a password: not echoed
        return
    meant = f"journal:{url}" if Path(url).suffix in (".log", ".journal") else f"sqlite:///{url}"
    raise UserError(f"storage {url!r} is a file path, not a storage URL; did you mean {meant}?")


class _WholeLineJournal(JournalFileBackend):
    """Optuna's journal file, whose appends leave no half record behind.

    On a full disk Optuna's own append can leave part of a line; the next append, once there is space again,
    glues onto it, and every later read of the journal fails on that line. Here a failed append cuts the file
    back to where it ended, under the same lock.
    """

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        with get_lock_file(self._lock), open(self._file_path, "ab", buffering=0) as file:
            end = file.tell()
            try:
                written = 0
                while written < len(data):
                    written += file.write(data[written:])
                os.fsync(file.fileno())
            except OSError:
                file.truncate(end)
                raise


def _open_journal(url: str, path: Path, read_only: bool, retry_seconds: float) -> RetryingStorage:
    if not path.parent.exists():
        raise UserError(f"folder {path.parent} for the journal storage does not exist")
    if read_only and not path.is_file():
        raise UserError(f"no storage file {path}")
    if not read_only:
        _refuse_unwritable(path, "journal")
    lock = contextlib.nullcontext() if read_only else _file_lock(Path(f"{path}.open.lock"), LOCK_TIMEOUT_S,
                                                                   "opening the journal")
    try:
        with lock:
            journal = JournalStorage(_WholeLineJournal(str(path)))
    except (OSError, ValueError) as error:
        fault = storage_fault(error, "journal", path, url)
        if fault is None:
            raise
        raise fault from error
    return RetryingStorage(journal, url, retry_seconds=retry_seconds, read_only=read_only)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """The file lock at `path`, waited for up to `timeout` seconds, looking every LOCK_POLL_S.

    filelock looks every 50 ms by default: a worker that found the budget lock held (for the few milliseconds of
    counting and asking) then slept longer than a tiny trial takes.
    """
    try:
        with FileLock(str(path), timeout=timeout).acquire(poll_interval=LOCK_POLL_S):
            yield
    except Timeout:
        raise UserError(f"another process held {path} for over {timeout:.0f}s while {what}; "
                        "if none is running, delete that file") from None


@contextlib.contextmanager
def _advisory_lock(engine: sqlalchemy.engine.Engine, key: int) -> Iterator[None]:
    """A PostgreSQL advisory lock, held on its own connection: one holder at a time across every host."""
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()


@contextlib.contextmanager
def _postgres_creation_lock(url: str, connect_args: dict[str, Any]) -> Iterator[None]:
    """Optuna's CREATE TABLEs from two processes at once collide in pg_type; one process creates at a time."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    try:
        with _advisory_lock(engine, CREATION_LOCK_KEY):
            yield
    finally:
        engine.dispose()


def open_storage(
    url: str = DEFAULT_STORAGE,
    *,
    read_only: bool = False,
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
    grace_period: int = GRACE_PERIOD_S,
    busy_timeout: float = SQLITE_BUSY_TIMEOUT_S,
    retry_seconds: float = RETRY_SECONDS,
) -> RetryingStorage:
    """Storage for `url`: "sqlite:///studies.db", "postgresql://user:pw@host/db", "journal:PATH".

    Many processes may open a storage that does not exist yet at the same moment (a launcher's workers, a
    SLURM array): creating it is serialized by a lock file beside a SQLite or journal file, and by an
    advisory lock on PostgreSQL. A malformed URL, a missing driver or an unreachable database is a UserError
    naming the (redacted) URL. `busy_timeout` is how long SQLite waits for another writer per statement.

    `read_only` opens an existing storage for reading alone: no lock file, no WAL pragma, no heartbeat, so a
    file on a read-only mount or without write permission serves reading commands. Without it such a file is
    refused in one line (StorageUnavailable) before anything is created beside it; so is a damaged file.
    """
    _refuse_plain_path(url)
    path = journal_path(url)
    if path is not None:
        return _open_journal(url, path, read_only, retry_seconds)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise UserError(f"malformed storage URL {redact(url)!r}; expected e.g. {DEFAULT_STORAGE}, "
                        "postgresql://user:password@host/db or journal:PATH") from None
    backend = parsed.get_backend_name()
    db_path = sqlite_path(url)
    engine_kwargs: dict = {"pool_pre_ping": True}
    creation_lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    if backend == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": busy_timeout}}
        if db_path is not None:
            if db_path.parent and not db_path.parent.exists():
                raise UserError(f"folder {db_path.parent} for the SQLite storage does not exist")
            if read_only and not db_path.is_file():
                raise UserError(f"no storage file {db_path}")
            if not read_only:
                _refuse_unwritable(db_path, "sqlite")
                creation_lock = _file_lock(Path(f"{db_path}.open.lock"), LOCK_TIMEOUT_S, "creating the storage")
    elif backend == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        if not read_only:
            creation_lock = _postgres_creation_lock(url, engine_kwargs["connect_args"])
    try:
        with creation_lock:
            if db_path is not None and read_only:
                engine_kwargs = {"creator": _sqlite_reader(db_path, busy_timeout)}
                _check_sqlite(engine_kwargs["creator"], db_path)
            elif db_path is not None:
                if db_path.is_file():
                    _check_sqlite(lambda: sqlite3.connect(db_path, timeout=busy_timeout), db_path)
                _prepare_sqlite(db_path, busy_timeout)
            rdb = FastReadRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                skip_table_creation=read_only,
                heartbeat_interval=None if read_only else heartbeat_interval,
                grace_period=None if read_only else grace_period,
                heartbeat_stale_trial_callback=(None if read_only
                                                else RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)),
            )
    except (sqlalchemy.exc.NoSuchModuleError, ModuleNotFoundError, ImportError) as error:
        raise UserError(f"no database driver for {redact(url)} ({error}); for PostgreSQL: "
                        "pip install 'stl10-search[postgres]'") from None
    except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as error:
        fault = storage_fault(error, backend, db_path, redact(url))
        if fault is not None:
            raise fault from error
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UserError(f"cannot open storage {redact(url)}: {reason}") from None
    if backend == "sqlite" and not read_only:
        sqlalchemy.event.listen(rdb.engine, "connect", _sqlite_pragmas)
        rdb.engine.dispose()  # connections made so far lack the pragma
    return RetryingStorage(optuna.storages.get_storage(rdb), url, rdb=rdb, retry_seconds=retry_seconds,
                           read_only=read_only)


def _sqlite_pragmas(connection, _record) -> None:
    """WAL with synchronous=NORMAL: a commit no longer waits for fsync; the file cannot be corrupted by a crash.

    Chosen by measurement (2-core CPU, SQLite 3.40, other processes running; `bench.search_throughput` part 2 and
    loading the 10,000-trial study of `bench.large_study`):
    - synchronous=NORMAL against FULL: storage time per tiny trial 41 ms against 111 ms (CPU 24 against 32 ms).
    - cache_size=64 MB, temp_store=MEMORY, mmap_size=256 MB, each and all three: none paid. SQLite's own part of
      loading 10,000 trials is 0.4 s of 1.5 s (the rest builds Python objects and parses JSON); cache_size and
      temp_store cut that part by 60 ms on a fresh connection, and the whole load moved by 0-6%, within the noise
      (CPU 1.44-1.56 s for every variant), as did the tiny trials' storage time (26-28 ms for every variant).
      A 64 MB cache would also hold up to 64 MB per pooled connection. Not kept.
    """
    connection.execute("PRAGMA synchronous=NORMAL")


@contextlib.contextmanager
def budget_lock(storage: RetryingStorage, name: str) -> Iterator[None]:
    """A lock across processes (and hosts, for PostgreSQL) around "count trials, then start one" in study `name`.

    Without it two workers can both see one free slot and both start a trial, and the budget overshoots.
    """
    if storage.storage_file is not None:
        with _file_lock(Path(f"{storage.storage_file}.{name}.lock"), LOCK_TIMEOUT_S, "starting a trial"):
            yield
        return
    if storage.kind == "postgresql" and storage.engine is not None:
        with _advisory_lock(storage.engine, int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)):
            yield
        return
    yield  # other databases: best effort, the budget may overshoot by up to one trial per worker


@contextlib.contextmanager
def exclusive_worker(storage: BaseStorage, study_names: Iterable[str]) -> Iterator[None]:
    """For a journal file: hold its worker lock for this worker's life, and queue again what a dead one left.

    A journal has no heartbeats, so the trial of a killed worker would stay RUNNING and hold a slot of the
    budget forever. One worker at a time makes every RUNNING trial found on taking the lock such a trial: it
    is failed and a WAITING copy queued, as the heartbeat of an RDB storage does. The OS releases the lock
    of a process that dies. Other storages: nothing to do.
    """
    if not isinstance(storage, RetryingStorage) or storage.kind != "journal":
        yield
        return
    lock = FileLock(f"{storage.storage_file}.worker.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"journal storage takes one worker at a time, and another worker is using "
                        f"{storage.storage_file}; for parallel workers use SQLite (sqlite:///FILE, one machine) "
                        "or PostgreSQL") from None
    try:
        for name in study_names:
            requeue_orphaned_trials(storage, name)
        yield
    finally:
        lock.release()


def requeue_orphaned_trials(storage: BaseStorage, study_name: str) -> list[int]:
    """Fail every RUNNING trial of the study and queue a copy (same params, user attrs, failed_trial).

    Only for a caller that knows no worker is alive (see exclusive_worker). Returns the failed trial numbers.
    """
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    study = optuna.load_study(study_name=study_name, storage=storage)
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    failed = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            retry(study, copy.deepcopy(storage.get_trial(trial_id)))
            failed.append(trial.number)
    return failed

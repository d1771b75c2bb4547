"""The storage's own faults in the user's world: a damaged file, a read-only file or mount, a full disk.

Each is one line that names the file and what to do, and loses nothing already stored. The weights `best`
saves are written whole or not at all. A real finished search (logreg on the tiny ImageFolder, tested by
`best`) is built once per storage kind; each test works on a copy.

Full and read-only disks are made for real where this process may mount (a small tmpfs, a read-only bind
mount; root in CI), and skipped elsewhere. Without root powers (`setpriv`), file permissions make a file
read-only too. A write into /dev/full (through a symlink where the code writes its temporary file) and
SQLite's max_page_count give a full disk anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search.cli import main
from search.errors import StorageUnavailable
from search.storage import open_storage
from search.records import BestResult, TrialRecord

REPO_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "STL10_SEARCH_TEST_POSTGRES_URL"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- helpers ---------------------------------------------------------------------------------------------------

def _url(kind: str, folder: Path) -> str:
    return f"sqlite:///{folder / 'studies.db'}" if kind == "sqlite" else f"journal:{folder / 'journal.log'}"


def _file(kind: str, folder: Path) -> Path:
    return folder / ("studies.db" if kind == "sqlite" else "journal.log")


def _one_line(err: str, *words: str) -> str:
    """The error of a command that failed as a user error should: its last line, after its progress lines,
    holding `words`; no traceback."""
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("stl10-search: error: "), err
    for word in words:
        assert word in last, (word, last)
    return last


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A folder on a 1 MiB tmpfs, to be filled for real; skipped where this process may not mount."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)):
        pytest.skip("mounting a tmpfs is not permitted here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path, leave: int = 0) -> Path:
    """Fill the disk under `folder` with one file, then free `leave` bytes of it; returns the file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as file:
        chunk = 1 << 16
        while chunk:
            try:
                file.write(b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                chunk //= 2
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.fixture
def read_only_mount(tmp_path: Path):
    """mount(source) -> the same folder again, bind-mounted read-only; skipped where mount is not permitted."""
    mounted: list[Path] = []

    def mount(source: Path) -> Path:
        target = tmp_path / f"read-only-{source.name}"
        target.mkdir()
        if not _mount("--bind", str(source), str(target)):
            pytest.skip("bind mounts are not permitted here")
        mounted.append(target)
        if not _mount("-o", "remount,bind,ro", str(target)):
            pytest.skip("read-only remounts are not permitted here")
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions bind this process: as root, without CAP_DAC_OVERRIDE."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root here, and setpriv cannot drop CAP_DAC_OVERRIDE: file permissions do not bind")
    return prefix


def _cli(*args: str, prefix: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "search.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# --- a finished search, per storage kind -------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sqlite", "journal"])
def finished(request, tiny_imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A storage of one logreg study with 3 finished trials, tested by `best` (weights in artifacts/); and
    `untested`, a copy made before `best` ran. Read-only for tests: copy() it first."""
    from search.worker import work

    kind = request.param
    folder = tmp_path_factory.mktemp(f"finished-{kind}")
    cache = folder.parent / f"cache-{kind}"
    data = ["--dataset", "imagefolder", "--data-root", str(tiny_imagefolder), "--image-size", "16",
            "--cache-dir", str(cache)]
    url = _url(kind, folder)
    assert main(["search", "--model", "logreg", "--n-trials", "3", "--workers", "0", "--pruner", "none",
                 "--param", "epochs=2", "--storage", url, *data]) == 0
    done = work(open_storage(url), ["logreg"], torch.device("cpu"), threading.Event(),
                data_overrides={"cache_dir": cache}, log=lambda message: None)
    assert done == {"logreg": 3}
    untested = folder.parent / f"untested-{kind}"
    untested.mkdir()
    (_copy_sqlite if kind == "sqlite" else shutil.copy2)(_file(kind, folder), _file(kind, untested))
    assert main(["best", "--model", "logreg", "--storage", url, "--cache-dir", str(cache)]) == 0
    return {"kind": kind, "folder": folder, "untested": untested, "cache": str(cache), "data": data}


def _copy(source: Path, tmp_path: Path, name: str = "storage") -> Path:
    """A copy of a storage folder: the storage file (SQLite's through its backup API, WAL included), its
    artifacts, no lock files."""
    target = tmp_path / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.lock", "studies.db*"))
    if (source / "studies.db").exists():
        _copy_sqlite(source / "studies.db", target / "studies.db")
    return target


def _copy_sqlite(source: Path, target: Path) -> None:
    with contextlib.closing(sqlite3.connect(source)) as original, contextlib.closing(sqlite3.connect(target)) as copy:
        original.backup(copy)


# --- a damaged file ------------------------------------------------------------------------------------------------

def _damage(path: Path, at: float, size: int = 4096) -> None:
    """Overwrite `size` bytes at fraction `at` of the file, page-aligned, as a failing disk or a bad copy would."""
    with open(path, "r+b") as file:
        file.seek(int(path.stat().st_size * at) // 4096 * 4096)
        file.write(bytes(range(256)) * (size // 256))


def _sqlite_finds_damage(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            return connection.execute("PRAGMA quick_check").fetchall() != [("ok",)]
    except sqlite3.DatabaseError:
        return True


@pytest.mark.parametrize("at", [0.25, 0.5, 0.75])  # some damage SQLite meets at opening, some only in a query
@pytest.mark.parametrize("command", ["search", "best", "report", "dashboard"])
def test_a_damaged_storage_is_one_line_naming_the_file_and_what_to_do(finished: dict, tmp_path: Path, capsys,
                                                                     monkeypatch, command: str, at: float) -> None:
    def serve(*args, **kwargs):
        raise AssertionError("the dashboard went on to serve a damaged storage")

    monkeypatch.setattr("search.dashboard.serve", serve)
    kind = finished["kind"]
    folder = _copy(finished["folder"], tmp_path)
    path = _file(kind, folder)
    _damage(path, at)
    if kind == "sqlite":
        assert _sqlite_finds_damage(path)  # the damage hit pages in use
    url = _url(kind, folder)
    argv = {"search": ["search", "--model", "logreg", "--workers", "0", *finished["data"]],
            "best": ["best", "--cache-dir", finished["cache"]],
            "report": ["report", "--out", str(tmp_path / "report")],
            "dashboard": ["dashboard", "--port", "0"]}[command]
    assert main([*argv, "--storage", url]) == 2
    other = "--storage sqlite:///OTHER.db" if kind == "sqlite" else "--storage journal:OTHER.log"
    _one_line(capsys.readouterr().err, str(path), "is damaged", "restore it from a backup", other)


@pytest.mark.parametrize("finished", ["sqlite"], indirect=True)  # a journal is read whole at opening
def test_a_storage_damaged_while_open_is_one_line_at_its_next_call(finished: dict, tmp_path: Path) -> None:
    """Damage after opening is found by the next query, not only by the check at opening."""
    folder = _copy(finished["folder"], tmp_path)
    storage = open_storage(_url("sqlite", folder))
    study_id = storage.get_study_id_from_name("logreg")
    with open(folder / "studies.db", "r+b") as file:
        file.write(b"not a database any more")  # over SQLite's header
    storage.engine.dispose()  # the next call opens a new connection, as a long-running worker's would
    with pytest.raises(StorageUnavailable, match="is damaged") as caught:
        storage.get_study_user_attrs(study_id)
    assert "file is not a database" in str(caught.value) and "\n" not in str(caught.value)


# --- a read-only file or mount ---------------------------------------------------------------------------------------

def test_reading_commands_work_on_a_read_only_mount_and_writing_ones_refuse(finished: dict, tmp_path: Path,
                                                                           read_only_mount, capsys) -> None:
    kind = finished["kind"]
    folder = read_only_mount(_copy(finished["folder"], tmp_path))
    url = _url(kind, folder)

    assert main(["report", "--out", str(tmp_path / "report"), "--storage", url]) == 0, capsys.readouterr().err
    assert (tmp_path / "report" / "report.html").is_file()
    capsys.readouterr()
    assert main(["best", "--storage", url, "--cache-dir", finished["cache"]]) == 0  # no plot refresh: nothing written
    out, err = capsys.readouterr()
    assert out.startswith("logreg: test accuracy") and "already tested" in err

    for argv in (["best", "--force", "--cache-dir", finished["cache"]],
                 ["search", "--model", "logreg", "--workers", "0", *finished["data"]],
                 ["worker", "--model", "logreg", "--device", "cpu"]):
        assert main([*argv, "--storage", url]) == 2
        copy = "sqlite:///COPY.db" if kind == "sqlite" else "journal:COPY.log"
        _one_line(capsys.readouterr().err, str(_file(kind, folder)), "is read-only", f"pass --storage {copy}")


def test_best_on_a_read_only_storage_refuses_to_retrain_in_one_line(finished: dict, tmp_path: Path,
                                                                   read_only_mount, capsys) -> None:
    kind = finished["kind"]
    folder = read_only_mount(_copy(finished["untested"], tmp_path))
    assert main(["best", "--storage", _url(kind, folder), "--cache-dir", finished["cache"]]) == 2
    _one_line(capsys.readouterr().err, "is read-only", "no stored result for trial #", "retraining would store one")


def test_a_warm_start_reads_a_source_on_a_read_only_mount(finished: dict, tmp_path: Path, read_only_mount,
                                                          capsys) -> None:
    kind = finished["kind"]
    source = read_only_mount(_copy(finished["folder"], tmp_path))
    url = f"sqlite:///{tmp_path / 'new.db'}"
    code = main(["search", "--model", "logreg", "--workers", "0", "--n-trials", "3", "--storage", url,
                 "--warm-start", f"{_url(kind, source)}#logreg", "--warm-start-k", "2", *finished["data"]])
    assert code == 0, capsys.readouterr().err
    queued = optuna.load_study(study_name="logreg", storage=open_storage(url)).get_trials(states=(TrialState.WAITING,))
    assert len(queued) == 2 and all(TrialRecord.load(t).warm_start for t in queued)


def _dashboard_answers(url: str, prefix: list[str] | None = None) -> tuple[list[dict], dict, bytes]:
    """Start `dashboard --port 0`, read the address it prints, fetch (studies, logreg's detail, its weights)."""
    import re
    import urllib.request

    process = subprocess.Popen([*(prefix or []), sys.executable, "-m", "search.cli", "dashboard", "--port", "0",
                                "--storage", url], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines, found = [], None
        for line in process.stdout:  # the address is printed once the port is bound
            lines.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
            if found:
                break
        assert found, "".join(lines)
        address = found.group(1)

        def get(path: str) -> bytes:
            with urllib.request.urlopen(address + path, timeout=30) as response:
                return response.read()

        studies = json.loads(get("api/studies"))["study_summaries"]
        detail = json.loads(get(f"api/studies/{studies[0]['study_id']}"))
        weights = get(f"artifacts/{studies[0]['study_id']}/{detail['artifacts'][0]['artifact_id']}")
        return studies, detail, weights
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_dashboard_serves_a_storage_on_a_read_only_mount(finished: dict, tmp_path: Path, read_only_mount) -> None:
    kind = finished["kind"]
    folder = read_only_mount(_copy(finished["folder"], tmp_path))
    studies, detail, weights = _dashboard_answers(_url(kind, folder))
    assert [s["study_name"] for s in studies] == ["logreg"] and len(detail["trials"]) == 3
    artifact_id = detail["artifacts"][0]["artifact_id"]
    assert weights == (folder / "artifacts" / artifact_id).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", pytest.param("folder", marks=pytest.mark.extended)])
def test_file_permissions_make_a_storage_read_only_too(finished: dict, tmp_path: Path, what: str) -> None:
    """No mount: a storage file (or its folder) without write permission, seen by a process they bind."""
    prefix = _without_root_powers()
    kind = finished["kind"]
    folder = _copy(finished["folder"], tmp_path)
    path = _file(kind, folder)
    path.chmod(0o444)
    if what == "folder":
        folder.chmod(0o555)
    try:
        url = _url(kind, folder)
        report = _cli("report", "--out", str(tmp_path / "report"), "--storage", url, prefix=prefix)
        assert report.returncode == 0, report.stderr
        best = _cli("best", "--storage", url, "--cache-dir", finished["cache"], prefix=prefix)
        assert best.returncode == 0 and best.stdout.startswith("logreg: test accuracy"), best.stderr
        search = _cli("search", "--model", "logreg", "--workers", "0", "--storage", url, *finished["data"],
                      prefix=prefix)
        assert search.returncode == 2
        _one_line(search.stderr, str(path), "is read-only", "Permission denied")
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".lock")]  # no lock file was made
    finally:
        folder.chmod(0o755)


@pytest.mark.postgres
@pytest.mark.parametrize("finished", ["sqlite"], indirect=True)  # for its data options only
def test_a_read_only_postgres_session_reads_results_and_refuses_writes(finished: dict, tmp_path: Path,
                                                                       capsys) -> None:
    """A database user (here: every transaction) that may only read: reading commands work, writing is one line."""
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} is not set (.ci/postgres.sh starts a server)")
    url, prefix = os.environ[POSTGRES_ENV], f"t{uuid.uuid4().hex[:8]}-"
    assert main(["search", "--model", "logreg", "--workers", "0", "--n-trials", "2", "--storage", url,
                 "--study-prefix", prefix, *finished["data"]]) == 0
    read_only = url + ("&" if "?" in url else "?") + "options=-c%20default_transaction_read_only%3Don"
    try:
        assert main(["report", "--format", "json", "--out", str(tmp_path / "r"), "--storage", read_only,
                     "--study-prefix", prefix]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(["search", "--model", "logreg", "--workers", "0", "--n-trials", "3", "--storage", read_only,
                     "--study-prefix", prefix, *finished["data"]]) == 2
        err = _one_line(capsys.readouterr().err, "is read-only", "connect as a database user that may write")
        assert "password" not in err.lower() and url.split("@")[0].split(":")[-1] not in err
    finally:
        optuna.delete_study(study_name=f"{prefix}logreg", storage=open_storage(url))


# --- a full disk -----------------------------------------------------------------------------------------------------

def _limit_pages(storage, pages: int) -> None:
    """Every new connection of `storage` may grow the file to `pages` pages: SQLite answers SQLITE_FULL past it."""
    import sqlalchemy

    sqlalchemy.event.listen(storage.engine, "connect",
                            lambda connection, _: connection.execute(f"PRAGMA max_page_count = {pages}"))
    storage.engine.dispose()


def _pages(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA page_count").fetchone()[0]


@pytest.mark.parametrize("finished", ["sqlite"], indirect=True)  # SQLite's page limit
def test_a_full_sqlite_disk_is_one_line_and_keeps_what_was_stored(finished: dict, tmp_path: Path) -> None:
    folder = _copy(finished["folder"], tmp_path)
    path = folder / "studies.db"
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.load_study(study_name="logreg", storage=storage)
    before = [(t.number, t.state, t.value, t.params) for t in study.get_trials()]
    _limit_pages(storage, _pages(path))
    with pytest.raises(StorageUnavailable) as caught:
        study.set_user_attr("notes", "x" * 100_000)  # needs pages the file may not grow by
    message = str(caught.value)
    assert "no space left on device" in message and "database or disk is full" in message and str(path) in message
    assert "\n" not in message

    reopened = optuna.load_study(study_name="logreg", storage=open_storage(f"sqlite:///{path}"))  # checks the file
    assert [(t.number, t.state, t.value, t.params) for t in reopened.get_trials()] == before
    assert "notes" not in reopened.user_attrs
    reopened.set_user_attr("notes", "x" * 100_000)  # with space again, the same write goes through


def test_a_worker_meeting_a_full_disk_stops_and_its_trial_runs_again(tiny_search, monkeypatch) -> None:
    """Not "invalid parameters": the storage's fault stops the worker; the trial is queued again (at once, or by
    the heartbeat of the next worker), and the budget is met exactly."""
    import search.worker
    from search.worker import work

    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    run_trial = search.worker.run_trial

    def trial_on_a_full_disk(*args, on_epoch, **kwargs):
        def first_epoch(metrics):
            _limit_pages(storage, _pages(tiny_search.folder / "studies.db"))
            trial = optuna.load_study(study_name="logreg", storage=storage).get_trials(states=(TrialState.RUNNING,))[0]
            storage.set_trial_user_attr(trial._trial_id, "notes", "x" * 100_000)  # the trial's next write
            on_epoch(metrics)

        return run_trial(*args, on_epoch=first_epoch, **kwargs)

    monkeypatch.setattr(search.worker, "run_trial", trial_on_a_full_disk)
    with pytest.raises(StorageUnavailable, match="no space left on device"):
        work(storage, ["logreg"], torch.device("cpu"), threading.Event(), log=lambda message: None)
    monkeypatch.undo()

    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.load_study(study_name="logreg", storage=storage)
    if study.get_trials(states=(TrialState.RUNNING,)):  # its requeue met the full disk too: the heartbeat's turn
        time.sleep(2.5)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL and "invalid parameters" not in str(TrialRecord.load(first).reason)
    queued = [t.params or t.system_attrs.get("fixed_params") for t in trials if t.state == TrialState.WAITING]
    assert queued == [first.params]
    assert work(storage, ["logreg"], torch.device("cpu"), threading.Event(), log=lambda message: None) == {"logreg": 2}
    assert len(study.get_trials(states=FINISHED)) == 2


@pytest.mark.slow
def test_a_worker_on_a_full_disk_exits_in_one_line_and_the_storage_stays_whole(tiny_search, small_disk) -> None:
    url = f"sqlite:///{small_disk / 'studies.db'}"
    tiny_search.create(url, 2)
    filler = _fill(small_disk)
    worker = tiny_search.start_worker(url, "--heartbeat-interval", "1", "--grace-period", "2", name="full")
    assert worker.wait(timeout=240) == 2
    _one_line(tiny_search.output("full"), str(small_disk / "studies.db"), "no space left on device")

    filler.unlink()
    with contextlib.closing(sqlite3.connect(small_disk / "studies.db")) as connection:
        assert connection.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    time.sleep(2.5)  # a trial the worker left running is stale now, for the next worker to run again
    worker = tiny_search.start_worker(url, "--heartbeat-interval", "1", "--grace-period", "2", name="after")
    assert worker.wait(timeout=240) == 0, tiny_search.output("after")
    assert len([t for t in tiny_search.trials(url) if t.state in FINISHED]) == 2


def test_a_journal_on_a_full_disk_keeps_whole_records(tmp_path: Path, small_disk) -> None:
    """Optuna's journal append leaves half a record on a full disk; the next append glued onto it made every
    later read fail. Here the journal is cut back, the write is one line, and it goes through with space again."""
    url = f"journal:{small_disk / 'journal.log'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    size = (small_disk / "journal.log").stat().st_size
    filler = _fill(small_disk, leave=8192)  # room for part of the record
    with pytest.raises(StorageUnavailable, match="no space left on device") as caught:
        study.set_user_attr("notes", "x" * 50_000)
    assert "No space left on device" in str(caught.value)
    assert (small_disk / "journal.log").stat().st_size == size
    filler.unlink()
    study.set_user_attr("notes", "x" * 50_000)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    reopened = optuna.load_study(study_name="s", storage=open_storage(url))
    assert len(reopened.trials) == 4 and reopened.user_attrs["notes"] == "x" * 50_000


# --- weights written whole or not at all ---------------------------------------------------------------------------

def _weights_study(folder: Path, kind: str) -> optuna.Study:
    return optuna.load_study(study_name="logreg", storage=open_storage(_url(kind, folder)))


def test_weights_that_cannot_be_written_are_not_registered(finished: dict, tmp_path: Path, capsys) -> None:
    """The temporary weights file leads to /dev/full: the disk is full when `best` writes the weights."""
    from search.artifacts import weights_artifact_id

    kind = finished["kind"]
    folder = _copy(finished["untested"], tmp_path)
    artifacts = folder / "artifacts"
    artifacts.mkdir()
    artifact_id = weights_artifact_id(_weights_study(folder, kind))
    (artifacts / f".{artifact_id}.{os.getpid()}.tmp").symlink_to("/dev/full")
    assert main(["best", "--storage", _url(kind, folder), "--cache-dir", finished["cache"]]) == 2
    _one_line(capsys.readouterr().err, "cannot write the weights of study 'logreg'", "No space left on device",
              "nothing was registered")
    study = _weights_study(folder, kind)
    assert optuna.artifacts.get_all_artifact_meta(study) == []
    assert "best_result" not in study.user_attrs
    assert list(artifacts.iterdir()) == []  # no temporary file left


def test_weights_on_a_full_disk_leave_no_registered_partial_file(finished: dict, tmp_path: Path, small_disk,
                                                                 capsys) -> None:
    """The issue's case: a full artifacts disk left 100 KB of 167 KB registered on the study."""
    kind = finished["kind"]
    folder = _copy(finished["untested"], tmp_path)
    _fill(small_disk, leave=4096)  # the weights take about 14 KB
    assert main(["best", "--storage", _url(kind, folder), "--artifacts", str(small_disk), "--cache-dir",
                 finished["cache"]]) == 2
    _one_line(capsys.readouterr().err, "No space left on device", "nothing was registered")
    assert optuna.artifacts.get_all_artifact_meta(_weights_study(folder, kind)) == []
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_best_force_replaces_the_study_weights(finished: dict, tmp_path: Path, capsys) -> None:
    kind = finished["kind"]
    folder = _copy(finished["folder"], tmp_path)
    url = _url(kind, folder)
    first = BestResult.load(_weights_study(folder, kind)).to_json()
    assert main(["best", "--force", "--storage", url, "--cache-dir", finished["cache"]]) == 0, capsys.readouterr().err
    study = _weights_study(folder, kind)
    second = BestResult.load(study).to_json()
    assert second["artifact_id"] == first["artifact_id"]
    assert [p.name for p in (folder / "artifacts").iterdir()] == [second["artifact_id"]]
    metas = optuna.artifacts.get_all_artifact_meta(study)
    assert [(m.artifact_id, m.filename) for m in metas] == [(second["artifact_id"], second["artifact_file"])]
    weights = torch.load(folder / "artifacts" / second["artifact_id"], weights_only=True)
    assert set(weights) and all(isinstance(v, torch.Tensor) for v in weights.values())


def test_a_checkpoint_that_cannot_be_written_warns_with_the_os_reason(tmp_path: Path, caplog) -> None:
    from search.trial import Checkpoint

    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"trial": 0})
    (tmp_path / f"trial-0.pt.{os.getpid()}.tmp").symlink_to("/dev/full")  # the disk is full when it is written
    checkpoint.save({"weights": torch.zeros(10_000)}, {"numerics": "cpu-fp32", "images": "cpu"})
    warning = next(r.getMessage() for r in caplog.records if "could not write checkpoint" in r.getMessage())
    assert "No space left on device" in warning and "enforce fail" not in warning
    assert list(tmp_path.iterdir()) == []

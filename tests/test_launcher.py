"""search/launcher.py: its workers never outlive it unnoticed, and its progress line survives `| tee`.

The "workers" here are tiny Python processes that record the signals they get in a file, started the way
the launcher starts real ones (own session), so each test runs in a second or two.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest
import torch

import search.launcher
import search.progress
from search.commands.results import best_device as _best_device
from search.errors import UserError
from search.launcher import (LAUNCHER_PID_ENV, WorkerSlot, check_worker_count, plan_workers, start_workers,
                             supervise)
from search.progress import ProgressDisplay, StudyStatus
from search.studies import Counts

REPO_ROOT = Path(__file__).resolve().parent.parent

# A worker stand-in: says "ready", notes each SIGTERM; exits on SIGTERM unless told to ignore it.
FAKE_WORKER = """
import signal, sys, time
log, on_term = sys.argv[1], sys.argv[2]
def term(signum, frame):
    open(log, "a").write("TERM\\n")
    if on_term == "exit":
        sys.exit(0)
signal.signal(signal.SIGTERM, term)
open(log, "a").write("ready\\n")
while True:
    time.sleep(0.02)
"""


@pytest.fixture
def fake_workers(tmp_path: Path):
    """Start stand-in workers: fake_workers("exit", "ignore") -> (processes, their logs); any left are killed after."""
    started: list[subprocess.Popen] = []

    def start(*on_term: str) -> tuple[list[subprocess.Popen], list[Path]]:
        logs = [tmp_path / f"worker-{len(started) + i}.log" for i in range(len(on_term))]
        processes = [subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(log), mode], start_new_session=True)
                     for log, mode in zip(logs, on_term)]
        started.extend(processes)
        _wait_for(lambda: all(log.is_file() and "ready" in log.read_text() for log in logs), "workers to start")
        return processes, logs

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    """Poll `condition`; the timeout only guards against a hang, it bounds no speed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


STATUSES = [StudyStatus("logreg", 20, Counts(complete=5, pruned=2, running=2), 0.312, None),
            StudyStatus("cnn", 4, Counts(running=1), None, None),
            StudyStatus("mobilenet_finetune", None, Counts(complete=1, failed=1), 0.871, None)]


@pytest.fixture
def no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    statuses = iter(STATUSES * 1000)
    monkeypatch.setattr(search.launcher, "study_status", lambda study, storage: next(statuses))


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_progress_on_an_80_column_terminal_shows_every_study_while_stdout_is_a_pipe(
        tmp_path: Path, monkeypatch, no_progress) -> None:
    """`stl10-search search ... | tee log` on 80 columns: a bar per study, stacked, none cut off or wrapped."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    saved_stdout, (pipe_read, pipe_write) = os.dup(1), os.pipe()
    terminal = open(slave, "w", closefd=False)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv("COLUMNS", "80")
    os.dup2(pipe_write, 1)
    try:
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"], start_new_session=True)
        assert supervise([worker], [object()] * 3, None, interval=0.05) == 0
    finally:
        os.dup2(saved_stdout, 1)
        for fd in (saved_stdout, pipe_read, pipe_write):
            os.close(fd)
        terminal.close()
    shown = b""
    while select.select([master], [], [], 0.2)[0]:
        shown += os.read(master, 65536)
    os.close(slave)
    os.close(master)
    segments = [ANSI.sub("", part) for part in re.split(r"[\r\n]", shown.decode())]
    assert max(len(part) for part in segments) <= 80
    for name, counts in (("logreg", "7/20"), ("cnn", "0/4"), ("mobilenet_finetune", " 1, 1 ok")):
        assert any(part.startswith(name) and counts in part for part in segments), name
    assert any(part.startswith("search: ") and "elapsed, ETA" in part for part in segments)


def test_progress_without_a_terminal_is_plain_timestamped_lines_per_change(no_progress) -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, quiet_seconds=3600)
    display.show(STATUSES)
    display.show(STATUSES)  # nothing changed: nothing written
    changed = [STATUSES[0], StudyStatus("cnn", 4, Counts(complete=1), 0.4, None), STATUSES[2]]
    display.show(changed)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", stream.getvalue())
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] ", line) for line in lines)
    assert lines[-1].endswith("cnn: 1/4 finished (1 ok, 0 pruned, 0 failed, 0 running), best 40.0%; ETA 0:00")


def test_the_eta_follows_the_trial_rate_and_stops_at_the_deadline(monkeypatch) -> None:
    rates = search.progress.Rates()
    running = StudyStatus("cnn", 10, Counts(running=2), None, None)
    assert rates.eta(running, now=100.0) is None  # no trial finished yet: no rate
    assert rates.eta(StudyStatus("cnn", 10, Counts(complete=2, running=2), None, None), now=160.0) == 240.0
    monkeypatch.setattr(search.progress.time, "time", lambda: 1000.0)
    assert rates.eta(StudyStatus("cnn", 10, Counts(complete=2), None, 1100.0), now=160.0) == 100.0


def test_the_closing_summary_fits_100_columns(tmp_path: Path) -> None:
    import optuna

    study = optuna.create_study(study_name="a-long-prefix-for-the-studies-mobilenet_finetune", direction="maximize")
    study.set_user_attr("settings", {"n_trials": 120})
    study.set_user_attr("ended", "trial budget met (120 finished) " + "and a very long explanation " * 5)
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    text = search.launcher.summary_table(search.launcher.summary_records([study]))
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "1/120" in text and "50.00%" in text and "and a very long explanation" in text


def test_a_failing_launcher_stops_its_workers(fake_workers, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(study, storage) -> StudyStatus:
        raise RuntimeError("storage gone")

    monkeypatch.setattr(search.launcher, "study_status", broken)
    processes, logs = fake_workers("exit", "ignore")
    with pytest.raises(RuntimeError, match="storage gone"):
        supervise(processes, [object()], None, interval=0.05, grace=1.0)
    assert [p.poll() for p in processes] == [0, -signal.SIGKILL]  # one stopped on SIGTERM, one killed after grace
    assert all("TERM" in log.read_text() for log in logs)


def test_ctrl_c_once_stops_workers_and_twice_kills_them(fake_workers, no_progress) -> None:
    processes, logs = fake_workers("ignore", "ignore")  # each still busy with its "epoch"

    default = signal.getsignal(signal.SIGINT)

    def press_ctrl_c_twice() -> None:
        _wait_for(lambda: signal.getsignal(signal.SIGINT) is not default, "supervise to handle Ctrl-C")
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(lambda: all("TERM" in log.read_text() for log in logs), "SIGTERM to reach the workers")
        assert all(p.poll() is None for p in processes)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c_twice)
    presser.start()
    interrupts = supervise(processes, [], None, interval=0.05)
    presser.join()
    assert interrupts == 2
    assert [p.returncode for p in processes] == [-signal.SIGKILL, -signal.SIGKILL]
    assert [log.read_text().count("TERM") for log in logs] == [1, 1]


def test_the_watch_sets_stop_once_the_worker_is_orphaned(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process: the launcher is this process's parent until os.getppid() says otherwise."""
    parent = os.getppid()
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(parent))
    stop = threading.Event()
    watcher = search.launcher.watch_launcher(stop, interval=0.02)
    time.sleep(0.2)
    assert not stop.is_set()
    monkeypatch.setattr(os, "getppid", lambda: 1)  # adopted by init: the launcher died
    assert stop.wait(60)
    watcher.join(timeout=60)


@pytest.mark.slow
def test_a_worker_notices_when_its_launcher_is_killed(tmp_path: Path) -> None:
    """The launcher here is an intermediate process; its child runs watch_launcher as a worker would."""
    worker = ("import threading\n"
              "from search.launcher import watch_launcher\n"
              "stop = threading.Event()\n"
              "assert watch_launcher(stop, interval=0.05) is not None\n"
              "print('watching', flush=True)\n"
              "print('stopped' if stop.wait(30) else 'still running', flush=True)\n")
    launcher = ("import os, subprocess, sys, time\n"
                f"env = dict(os.environ, {LAUNCHER_PID_ENV}=str(os.getpid()))\n"
                "subprocess.Popen([sys.executable, '-c', sys.argv[1]], env=env, stdout=open(sys.argv[2], 'w'))\n"
                "time.sleep(60)\n")
    log = tmp_path / "worker.log"
    process = subprocess.Popen([sys.executable, "-c", launcher, worker, str(log)], cwd=REPO_ROOT)
    try:
        _wait_for(lambda: log.is_file() and "watching" in log.read_text(), "the worker to watch", timeout=60)
        time.sleep(0.3)
        assert "stopped" not in log.read_text()  # its launcher is alive
    finally:
        process.kill()  # SIGKILL: the launcher cannot tell anyone
        process.wait()
    _wait_for(lambda: "stopped" in log.read_text(), "the worker to notice")


def test_a_worker_started_by_hand_watches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAUNCHER_PID_ENV, raising=False)
    assert search.launcher.watch_launcher(threading.Event()) is None


def test_workers_are_told_their_launcher_and_their_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[dict] = []
    monkeypatch.setattr(search.launcher.subprocess, "Popen", lambda command, **kwargs: started.append(kwargs["env"]))
    url = "postgresql://u:secret@h/db"
    start_workers([WorkerSlot("cpu", None, 1)] * 2, ["logreg"], url, [], tmp_path)
    assert [env[LAUNCHER_PID_ENV] for env in started] == [str(os.getpid())] * 2
    assert [env["STL10_SEARCH_STORAGE"] for env in started] == [url] * 2  # in the environment, not in `ps`


def test_a_journal_takes_one_worker_and_the_launcher_says_so(tmp_path: Path) -> None:
    check_worker_count(f"journal:{tmp_path / 'journal.log'}", 1)
    check_worker_count(f"sqlite:///{tmp_path / 'studies.db'}", 8)
    with pytest.raises(UserError, match="journal storage takes one worker at a time") as caught:
        start_workers([WorkerSlot("cpu", None, 1)] * 2, ["logreg"], f"journal:{tmp_path / 'journal.log'}", [],
                      tmp_path / "logs")
    assert "SQLite" in str(caught.value) and "PostgreSQL" in str(caught.value)
    assert not (tmp_path / "logs").exists()  # refused before any worker started


# --- workers sized to the machine ---------------------------------------------------------------------------

GIB = 1 << 30


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """A machine of `cores` usable cores and `memory` bytes available: machine(2, 24 * GIB)."""

    def set_machine(cores: int, memory: int | None) -> None:
        monkeypatch.setattr(search.launcher, "usable_cores", lambda: cores)
        monkeypatch.setattr(search.launcher, "available_memory", lambda: memory)

    return set_machine


def test_more_cpu_workers_than_cores_are_capped_with_a_warning(machine) -> None:
    machine(2, 24 * GIB)
    slots, warning = search.launcher.fit_to_machine([WorkerSlot("cpu", None, 1)] * 64, int(1.5 * GIB), 0, False)
    assert [(s.device, s.threads) for s in slots] == [("cpu", 1), ("cpu", 1)]
    assert warning == ("warning: 64 CPU workers do not fit this machine (2 usable core(s), 24.0 GiB available, about "
                       "1.5 GiB per worker): starting 2; pass --oversubscribe to start 64 anyway")


def test_cpu_workers_are_capped_by_memory_and_threads_fill_the_cores(machine) -> None:
    machine(16, 4 * GIB)
    slots, warning = search.launcher.fit_to_machine([WorkerSlot("cpu", None, 1)] * 8, int(1.5 * GIB), 0, False)
    assert len(slots) == 2 and {s.threads for s in slots} == {8}  # workers x threads == cores
    assert "starting 2" in warning
    slots, warning = search.launcher.fit_to_machine([WorkerSlot("cpu", None, 1)] * 4, GIB // 2, 0, False)
    assert len(slots) == 4 and {s.threads for s in slots} == {4} and warning is None


def test_oversubscribe_starts_every_worker_asked_for_and_says_so(machine) -> None:
    machine(2, 24 * GIB)
    slots, warning = search.launcher.fit_to_machine([WorkerSlot("cpu", None, 1)] * 6, GIB, 0, True)
    assert len(slots) == 6 and {s.threads for s in slots} == {1}
    assert "starting all 6 as asked (--oversubscribe)" in warning


def test_workers_per_gpu_are_capped_by_the_gpus_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("P", (), {"total_memory": 16 * GIB}))
    slots = [WorkerSlot("cuda:0", gpu, None) for gpu in ("0", "1") for _ in range(4)]
    fitted, warning = search.launcher.fit_to_machine(slots, GIB, 4 * GIB, False)  # 5 GiB a slot: 3 fit
    assert [s.visible_gpu for s in fitted] == ["0", "0", "0", "1", "1", "1"]
    assert warning == ("warning: 4 workers per GPU do not fit its 16 GiB (about 5.0 GiB each): starting 3 per GPU; "
                       "pass --oversubscribe to start 4 anyway")


UUIDS = "GPU-5f1c2a3b-0000-1111-2222-333344445555,GPU-9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff"
MIGS = "MIG-0a1b2c3d-1111-2222-3333-444455556666,MIG-7f6e5d4c-7777-8888-9999-aaaabbbbcccc"


@pytest.mark.parametrize("parent, gpus", [
    (None, "0,1"), (None, "2"), ("2,3", "0,1"), ("2,3", "1"), ("5,1,7", None), (UUIDS, "1,0"), (MIGS, "0,1"),
], ids=["unset", "unset-one", "numbers", "numbers-second", "numbers-all", "uuids", "mig"])
def test_each_worker_sees_the_launcher_s_own_gpu_at_its_index_and_run_tests_on_the_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parent: str | None, gpus: str | None) -> None:
    """--gpus indexes the launcher's own CUDA_VISIBLE_DEVICES (SLURM sets it): a child gets the entry at that
    index, whatever its form; without the variable, indices are physical GPUs."""
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    own = parent.split(",") if parent is not None else [str(i) for i in range(4)]  # the launcher's GPU i is own[i]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(own))
    started: list[dict] = []
    monkeypatch.setattr(search.launcher.subprocess, "Popen", lambda command, **kwargs: started.append(kwargs["env"]))
    start_workers(plan_workers(gpus, 2, None), ["cnn"], f"sqlite:///{tmp_path / 'studies.db'}", [], tmp_path)
    indices = [int(g) for g in gpus.split(",")] if gpus else list(range(len(own)))
    assert [env["CUDA_VISIBLE_DEVICES"] for env in started] == [own[i] for i in indices for _ in range(2)]
    best = torch.device("cuda" if _best_device(gpus) == "auto" else _best_device(gpus))  # auto is cuda:0
    assert own[best.index or 0] == started[0]["CUDA_VISIBLE_DEVICES"]  # `run` retrains on its first workers' GPU

"""Start worker processes (one or more per GPU, or on the CPU), show live progress, forward Ctrl-C, summarize.

Workers run in their own sessions, so a terminal's Ctrl-C reaches the launcher alone. The launcher therefore
owns their fate: it forwards Ctrl-C, stops them when it fails, and tells them its pid so that they stop by
themselves when it is killed outright (`watch_launcher`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from search.errors import UserError
from search.studies import ENDED_ATTR, count_trials, counts_of, search_seconds
from search.storage import storage_kind

LAUNCHER_PID_ENV = "STL10_SEARCH_LAUNCHER_PID"
STOP_GRACE_S = 60.0  # after SIGTERM, how long workers get to finish their epoch before SIGKILL


@dataclass(frozen=True)
class WorkerSlot:
    device: str  # as the worker sees it
    visible_gpu: str | None  # CUDA_VISIBLE_DEVICES for it (`child_visible_devices`), None on the CPU
    threads: int | None


def plan_workers(gpus: str | None, workers_per_gpu: int, cpu_workers: int | None) -> list[WorkerSlot]:
    """Worker slots: K per named GPU (each sees only its GPU), or CPU workers sharing the cores.

    GPU indices are this process's own (within its CUDA_VISIBLE_DEVICES when set), as `cuda:N` is here.
    """
    import torch

    if workers_per_gpu < 1:
        raise UserError(f"--workers-per-gpu must be at least 1, got {workers_per_gpu}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is not None and gpus.strip().lower() != "none":
        try:
            indices = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UserError(f"--gpus takes GPU indices like 0,1,2; got {gpus!r}") from None
        missing = [g for g in indices if not 0 <= g < available]
        if missing or not indices:
            named = ", ".join(map(str, missing)) if missing else repr(gpus)
            raise UserError(f"--gpus names GPU {named}, which does not exist: "
                            f"{available} GPU(s) visible")
    else:
        indices = list(range(available)) if gpus is None else []
    if indices and cpu_workers is None:
        return [WorkerSlot("cuda:0", child_visible_devices(g), None)
                for g in indices for _ in range(workers_per_gpu)]
    count = 1 if cpu_workers is None else cpu_workers
    if count < 0:
        raise UserError(f"--workers must be 0 or more, got {count}")
    threads = max(1, (os.cpu_count() or 1) // max(count, 1))
    return [WorkerSlot("cpu", None, threads) for _ in range(count)]


def child_visible_devices(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a child this process's GPU `index`: this process's own entry at
    that index (a number, a GPU-UUID or a MIG id; under SLURM and in containers the variable is always set), or
    the physical index when the variable is unset."""
    own = os.environ.get("CUDA_VISIBLE_DEVICES")
    return str(index) if own is None else [entry.strip() for entry in own.split(",")][index]


def check_worker_count(url: str, count: int) -> None:
    """A journal file has no heartbeats, so it takes one worker at a time: refuse more before any starts."""
    if count > 1 and storage_kind(url) == "journal":
        raise UserError(f"journal storage takes one worker at a time, and this launch would start {count}; "
                        "start one (--gpus none --workers 1, or --gpus N), or use SQLite (sqlite:///FILE, one "
                        "machine) or PostgreSQL for parallel workers")


def start_workers(slots: list[WorkerSlot], models: list[str], url: str, extra_args: list[str], log_dir: Path
                  ) -> list[subprocess.Popen]:
    """Each worker in its own session, so a terminal's Ctrl-C reaches the launcher alone, which forwards it."""
    check_worker_count(url, len(slots))
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index, slot in enumerate(slots):
        env = dict(os.environ, STL10_SEARCH_STORAGE=url, PYTHONUNBUFFERED="1",  # no password in `ps`
                   **{LAUNCHER_PID_ENV: str(os.getpid())})
        if slot.visible_gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.visible_gpu
        command = [sys.executable, "-m", "search.cli", "worker", "--model", ",".join(models), "--device", slot.device,
                   *extra_args]
        if slot.threads:
            command += ["--threads", str(slot.threads)]
        log = open(log_dir / f"worker-{index}.log", "a")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()
    return processes


def progress_line(studies: list[optuna.Study], storage) -> str:
    parts = []
    for study in studies:
        counts = count_trials(storage, study)
        best = best_value(study)
        parts.append(f"{study.study_name}: {finished_text(counts.finished, study)} done, {counts.pruned} pruned, "
                     f"{counts.failed} failed, {counts.running} running"
                     + (f", {counts.waiting} queued" if counts.waiting else "")
                     + (f", {counts.interrupted} interrupted" if counts.interrupted else "")
                     + (f", best {best:.1%}" if best is not None else ""))
    return " | ".join(parts)


def finished_text(finished: int, study: optuna.Study) -> str:
    """"7/20" against the study's trial budget, or "7" when only a time budget ends it."""
    budget = study.user_attrs.get("settings", {}).get("n_trials")
    return f"{finished}/{budget}" if budget else str(finished)


def best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None


def supervise(processes: list[subprocess.Popen], studies: list[optuna.Study], storage, interval: float = 2.0,
              grace: float = STOP_GRACE_S) -> int:
    """Show progress until every worker exits. Ctrl-C once: workers stop after their epoch; twice: killed.

    If the launcher itself fails here, its workers are stopped (SIGTERM, SIGKILL after `grace` seconds):
    in their own sessions they would otherwise run on out of reach of Ctrl-C.
    """
    interrupts = 0

    def on_signal(signum, frame) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print("\nstopping: workers finish their current epoch and queue their trial again "
                  "(Ctrl-C again to kill them now)", file=sys.stderr, flush=True)
            for p in processes:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        else:
            for p in processes:
                if p.poll() is None:
                    p.kill()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    tty = sys.stderr.isatty()
    last, last_print = "", 0.0
    try:
        while any(p.poll() is None for p in processes):
            time.sleep(interval)
            line = progress_line(studies, storage)
            now = time.monotonic()
            if tty:
                width = max(terminal_columns() - 1, 20)
                print("\r" + line[:width].ljust(width), end="", file=sys.stderr, flush=True)
            elif line != last or now - last_print > 60:
                print(line, file=sys.stderr, flush=True)
                last_print = now
            last = line
        if tty:
            print(file=sys.stderr)
    except BaseException:
        stop_workers(processes, grace)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return interrupts


def terminal_columns() -> int:
    """The width of stderr's terminal, where progress goes; stdout may be a pipe (`search ... | tee log`)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or shutil.get_terminal_size().columns
    except (OSError, ValueError, AttributeError):  # stderr replaced by an object without a terminal behind it
        return shutil.get_terminal_size().columns


def stop_workers(processes: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every running worker (it queues its trial again after its epoch), SIGKILL those left after `grace` s."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def watch_launcher(stop: threading.Event, interval: float = 1.0) -> threading.Thread | None:
    """In a worker that a launcher started: set `stop` once the launcher is gone (killed with SIGKILL, say).

    Nothing else would tell the worker, which runs in its own session. Stopped, it queues its trial again and
    exits instead of training on unwatched. Returns the watching thread; None for a worker started by hand.
    """
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit():
        return None

    def watch() -> None:
        while os.getppid() == int(launcher):  # the launcher is the parent; an orphan is adopted by another
            if stop.wait(interval):
                return
        print(f"worker: launcher (pid {launcher}) is gone; stopping after the current epoch", flush=True)
        stop.set()

    thread = threading.Thread(target=watch, name="watch-launcher", daemon=True)
    thread.start()
    return thread


def summary_table(studies: list[optuna.Study], storage) -> str:
    """Per study what its trials became, the best, and why the search ended. Failed is for settings that could
    not run; interrupted trials (Ctrl-C, a worker that died) were queued again and count apart."""
    rows = [("study", "finished", "complete", "pruned", "failed", "interrupted", "queued", "best val acc",
             "best trial", "search time", "ended")]
    for study in studies:
        trials = study.get_trials(deepcopy=False)
        counts, span = counts_of(trials), search_seconds(trials)
        best = best_value(study)
        best_number = study.best_trial.number if best is not None else None
        rows.append((study.study_name, finished_text(counts.finished, study), str(counts.complete),
                     str(counts.pruned), str(counts.failed), str(counts.interrupted), str(counts.waiting),
                     f"{best:.2%}" if best is not None else "-", f"#{best_number}" if best_number is not None else "-",
                     f"{span / 60:.1f} min", study.user_attrs.get(ENDED_ATTR) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i in (0, len(r) - 1) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows)

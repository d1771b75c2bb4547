"""Start worker processes (one or more per GPU, or on the CPU), show live progress, forward Ctrl-C, summarize.

Workers run in their own sessions, so a terminal's Ctrl-C reaches the launcher alone. The launcher therefore
owns their fate: it forwards Ctrl-C, stops them when it fails, and tells them its pid so that they stop by
themselves when it is killed outright (`watch_launcher`).
"""

from __future__ import annotations

import os
import re
import signal
import site
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.errors import UserError
from search.optuna_private import study_id
from search.progress import ProgressDisplay, StudyStatus, summary_lines
from search.records import TrialRecord
from search.studies import ENDED_ATTR, count_trials, counts_of, requeued_numbers, search_seconds
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


def usable_cores() -> int:
    """The cores this process may run on (a SLURM or cgroup CPU set), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available to new processes now (MemAvailable), None where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_memory_estimate() -> int:
    """Bytes one worker will hold: this launcher's own peak (it imported what a worker imports, loaded the same
    data and built each model once before starting any worker), plus half again for optimizer state and
    activations. Measured on the CPU: a logreg/mlp worker on 5,000 images at 64px peaked at 1.5 GB, with
    the launcher at 1.05 GB."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 * 1.5)


GPU_SLOT_OVERHEAD = 1 << 30  # a worker's CUDA context, cuDNN workspace and model, beyond the images it holds


def fit_to_machine(slots: list[WorkerSlot], per_worker: int, data_bytes: int, oversubscribe: bool
                   ) -> tuple[list[WorkerSlot], str | None]:
    """The slots this machine can hold, and a warning when some were dropped (or, with `oversubscribe`, kept).

    CPU workers: at most one per usable core and as many as the available memory holds at `per_worker` bytes
    each; threads are then spread so that workers x threads <= cores. GPU workers: per GPU, as many as its
    memory holds at `data_bytes` (the images a worker keeps on the GPU) plus GPU_SLOT_OVERHEAD each.
    """
    cpu = [s for s in slots if s.visible_gpu is None]
    if cpu:
        cores, memory = usable_cores(), available_memory()
        fits = min(cores, memory // max(per_worker, 1) if memory is not None else cores)
        count = len(cpu) if oversubscribe else min(len(cpu), max(fits, 1))
        threads = max(1, cores // count)
        fitted = [WorkerSlot(s.device, None, threads) for s in cpu[:count]]
        if len(cpu) <= fits:
            return fitted, None
        machine = f"{cores} usable core(s)" + (f", {memory / 2**30:.1f} GiB available" if memory else "")
        action = (f"starting all {len(cpu)} as asked (--oversubscribe)" if oversubscribe else
                  f"starting {count}; pass --oversubscribe to start {len(cpu)} anyway")
        return fitted, (f"warning: {len(cpu)} CPU workers do not fit this machine ({machine}, about "
                        f"{per_worker / 2**30:.1f} GiB per worker): {action}")
    import torch

    per_slot = data_bytes + GPU_SLOT_OVERHEAD
    total = torch.cuda.get_device_properties(0).total_memory if slots else 0
    fits = max(1, total // per_slot)
    kept: dict[str, int] = {}
    fitted = []
    for slot in slots:
        kept[slot.visible_gpu] = kept.get(slot.visible_gpu, 0) + 1
        if oversubscribe or kept[slot.visible_gpu] <= fits:
            fitted.append(slot)
    if max(kept.values(), default=0) <= fits:
        return fitted, None
    asked = max(kept.values())
    action = (f"starting {asked} per GPU as asked (--oversubscribe)" if oversubscribe else
              f"starting {fits} per GPU; pass --oversubscribe to start {asked} anyway")
    return fitted, (f"warning: {asked} workers per GPU do not fit its {total / 2**30:.0f} GiB (about "
                    f"{per_slot / 2**30:.1f} GiB each): {action}")


def check_worker_count(url: str, count: int) -> None:
    """A journal file has no heartbeats, so it takes one worker at a time: refuse more before any starts."""
    if count > 1 and storage_kind(url) == "journal":
        raise UserError(f"journal storage takes one worker at a time, and this launch would start {count}; "
                        "start one (--gpus none --workers 1, or --gpus N), or use SQLite (sqlite:///FILE, one "
                        "machine) or PostgreSQL for parallel workers")


def python_command(module: str) -> list[str]:
    """`python -P -m MODULE`: safe-path mode, so a user's own `data/`, `models/` or `models.py` in the working
    folder cannot shadow this project's packages in a child process (plain `-m` puts the working folder first
    on the import path, and there it wins even over an editable install)."""
    return [sys.executable, "-P", "-m", module]


def python_path() -> str:
    """PYTHONPATH for a child: the folder this process imported the project from, first, when it is not a site
    folder (a checkout run without installing): with -P the child would not find it otherwise."""
    import search

    root = str(Path(search.__file__).resolve().parent.parent)
    inherited = os.environ.get("PYTHONPATH", "")
    site_folders = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root in site_folders or root in inherited.split(os.pathsep):
        return inherited
    return os.pathsep.join(p for p in (root, inherited) if p)


def worker_log(log_dir: Path, index: int) -> Path:
    return log_dir / f"worker-{index}.log"


def start_workers(slots: list[WorkerSlot], models: list[str], url: str, extra_args: list[str], log_dir: Path
                  ) -> list[subprocess.Popen]:
    """Each worker in its own session, so a terminal's Ctrl-C reaches the launcher alone, which forwards it."""
    check_worker_count(url, len(slots))
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    import_path = python_path()
    for index, slot in enumerate(slots):
        env = dict(os.environ, STL10_SEARCH_STORAGE=url, PYTHONUNBUFFERED="1",  # no password in `ps`
                   **{LAUNCHER_PID_ENV: str(os.getpid())})
        if import_path:
            env["PYTHONPATH"] = import_path
        if slot.visible_gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.visible_gpu
        command = [*python_command("search.cli"), "worker", "--model", ",".join(models), "--device", slot.device,
                   *extra_args]
        if slot.threads:
            command += ["--threads", str(slot.threads)]
        log = open(worker_log(log_dir, index), "a")
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')}: worker {index} of {len(slots)} started by "
                  f"launcher pid {os.getpid()} on {slot.device} =====\n")
        log.flush()
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()
    return processes


def study_status(study: optuna.Study, storage) -> StudyStatus:
    """The study as the progress display shows it, read from the storage now."""
    attrs = study.user_attrs
    return StudyStatus(study.study_name, (attrs.get("settings") or {}).get("n_trials"),
                       count_trials(storage, study_id(study)),
                       best_value(study), attrs.get("deadline"))


def best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None


def supervise(processes: list[subprocess.Popen], studies: list[optuna.Study], storage, interval: float = 2.0,
              grace: float = STOP_GRACE_S, progress: bool = True) -> int:
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
    display = ProgressDisplay()
    try:
        while any(p.poll() is None for p in processes):
            time.sleep(interval)
            if progress:
                display.show([study_status(study, storage) for study in studies])
    except BaseException:
        stop_workers(processes, grace)
        raise
    finally:
        display.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return interrupts


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


def worker_error(log_path: Path) -> str | None:
    """The last error a worker's log shows: our one-line "stl10-search: error: ..." or a traceback's last line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("stl10-search: error: "):
            return line.removeprefix("stl10-search: error: ")
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
            return line
    return None


def search_failures(processes: list[subprocess.Popen], log_paths: list[Path], studies: list[optuna.Study]) -> list[str]:
    """One line per reason the search did not do its work: workers that exited with an error (with the error
    and the real log file), and studies where no trial finished although some failed (with the most common
    reason of their failures). Empty when the search did its work."""
    problems = []
    failed = [(p, log) for p, log in zip(processes, log_paths) if p.returncode not in (0, None)]
    if failed:
        errors = Counter(worker_error(log) or f"exit code {p.returncode}" for p, log in failed)
        error, count = errors.most_common(1)[0]
        problems.append(f"{len(failed)} of {len(processes)} worker(s) exited with an error: {error}"
                        + (f" ({count} of them)" if len(failed) > 1 else "")
                        + f"; see {failed[0][1].resolve()}")
    for study in studies:
        trials = study.get_trials(deepcopy=False)
        counts = counts_of(trials)
        if counts.finished == 0 and counts.failed:
            requeued = requeued_numbers(trials)
            reasons = Counter(TrialRecord.load(t).reason or "no reason stored" for t in trials
                              if t.state == TrialState.FAIL and t.number not in requeued)
            reason, count = reasons.most_common(1)[0]
            problems.append(f"{study.study_name}: no trial finished; {counts.failed} failed, {count} of them with: "
                            f"{reason}")
    return problems


def summary_records(studies: list[optuna.Study]) -> list[dict[str, Any]]:
    """Per study what its trials became, the best, and why the search ended, as plain values (`--json`)."""
    records = []
    for study in studies:
        trials = study.get_trials(deepcopy=False)
        counts, best = counts_of(trials), best_value(study)
        records.append({"study": study.study_name, "finished": counts.finished,
                        "trial_budget": (study.user_attrs.get("settings") or {}).get("n_trials"),
                        "complete": counts.complete, "pruned": counts.pruned, "failed": counts.failed,
                        "interrupted": counts.interrupted, "queued": counts.waiting, "best_val_accuracy": best,
                        "best_trial": study.best_trial.number if best is not None else None,
                        "search_seconds": search_seconds(trials), "ended": study.user_attrs.get(ENDED_ATTR)})
    return records


def summary_table(records: list[dict[str, Any]]) -> str:
    """`summary_records` in 100 columns. Failed is for settings that could not run; interrupted trials (Ctrl-C, a
    worker that died) were queued again."""
    rows = [("study", "finished", "complete", "pruned", "failed", "interrupted", "queued", "best val", "trial",
             "minutes")]
    for r in records:
        finished = f"{r['finished']}/{r['trial_budget']}" if r["trial_budget"] else str(r["finished"])
        best = r["best_val_accuracy"]
        rows.append((r["study"], finished, *(str(r[k]) for k in ("complete", "pruned", "failed", "interrupted",
                                                                 "queued")),
                     f"{best:.2%}" if best is not None else "-",
                     f"#{r['best_trial']}" if r["best_trial"] is not None else "-", f"{r['search_seconds'] / 60:.1f}"))
    return summary_lines(rows, [f"{r['study']} ended: {r['ended'] or '-'}" for r in records])

"""Search throughput: trials per minute for several worker counts on one device, GPU busy % while the search
ran, storage time per trial, and (optionally) what pruning saves.

    python -m bench.search_throughput                                     # CPU: tiny trials, 1 and 2 workers
    python -m bench.search_throughput --device cuda --workers-per-gpu 1,2,4
    python -m bench.search_throughput --prune-trials 12                  # also the pruning comparison

Part 1 runs `python -m search.cli search` in a fresh SQLite study per worker count, exactly as a user
launches it (`--gpus N --workers-per-gpu K` on CUDA, `--workers K` on the CPU). The trials cost the same
whatever is sampled: every parameter that sets the work (architecture, batch size, epochs, augmentation) is
fixed at the model's reference setting, and only lr, weight decay and dropout are searched, without pruning.
On CUDA they are real (default: the CNN at 64 px on --data-root, 3 epochs, 3,500 train images), so several
workers per GPU show whether they fill it; on the CPU they are tiny (logistic regression on 16 px synthetic
images, 1 epoch), so storage and process overhead dominate. trials/min counts from the first trial's start
to the last one's end (process and data start-up excluded); wall s is the whole command. On CUDA, GPU busy %
is the mean of `nvidia-smi` utilization samples in that same span, and memory the highest sample.

Part 2 (in this process, CPU, tiny trials) is the share of a trial spent in storage calls, and the calls\nper trial by method.
Part 3, only with --prune-trials N, runs a real small search (--prune-model at 32 px, --prune-epochs budget)
on --data-root with Hyperband pruning and without, with the most workers of part 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import optuna
from PIL import Image

from bench.launch import run_cli, tail
from bench.plain import DATA_ROOT_ENV, print_table
from search.family import get_family
from search.records import TrialRecord

SEARCHED = ("lr", "weight_decay")  # and every dropout: what part 1's trials vary; the rest is fixed


def write_tiny_dataset(root: Path, classes: int = 4, per_class: int = 16, size: int = 16) -> Path:
    for part, count in (("train", per_class), ("test", per_class // 2)):
        for c in range(classes):
            folder = root / part / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (size, size), (60 * c % 256, (i * 13) % 256, 128)).save(folder / f"{i}.png")
    return root


def fixed_params(model: str, epochs: int) -> list[str]:
    """--param values fixing everything but lr, weight decay and dropout at the model's reference setting."""
    reference = get_family(model).resolve({"epochs": epochs})
    return [f"{name}={value}" for name, value in reference.items()
            if name not in SEARCHED and not name.startswith("dropout") and name != "image_size"]


@dataclass(frozen=True)
class Launch:
    """How `search` places its workers: K per GPU `gpu`, or K CPU workers."""

    gpu: int | None

    def arguments(self, workers: int) -> list[str]:
        if self.gpu is None:
            return ["--workers", str(workers)]
        return ["--gpus", str(self.gpu), "--workers-per-gpu", str(workers)]


def search(workdir: Path, cache: Path, data_root: Path, model: str, trials: int, workers: int, launch: Launch,
           params: list[str], pruner: str, image_size: int, timeout: float, pack: str = "1") -> float:
    """`search` on a fresh SQLite storage in `workdir` (output in workdir/search.log, worker logs in
    workdir/logs/); returns its wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    arguments = ["search", "--model", model, "--n-trials", str(trials), *launch.arguments(workers),
                 "--dataset", "imagefolder", "--data-root", str(data_root), "--image-size", str(image_size),
                 "--pruner", pruner, "--cache-dir", str(cache), "--storage", f"sqlite:///{workdir}/studies.db",
                 "--log-dir", str(workdir / "logs"), "--pack", pack]
    for p in params:
        arguments += ["--param", p]
    log_path = workdir / "search.log"
    code, seconds = run_cli(arguments, log_path, timeout)
    if code != 0:
        print(f"  search with {workers} worker(s) exited with {code}; last lines of {log_path}:\n{tail(log_path)}",
              file=sys.stderr, flush=True)
    return seconds


def finished_trials(workdir: Path, model: str) -> list[optuna.trial.FrozenTrial]:
    path = workdir / "studies.db"
    if not path.is_file():
        return []
    try:
        study = optuna.load_study(study_name=model, storage=f"sqlite:///{path}")
    except KeyError:
        return []
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.datetime_complete]


def trial_span(trials: list[optuna.trial.FrozenTrial]) -> tuple[datetime, datetime] | None:
    """First trial started to last trial finished: the search itself, process and data start-up excluded."""
    if not trials:
        return None
    return min(t.datetime_start for t in trials), max(t.datetime_complete for t in trials)


def steady_rate(trials: list[optuna.trial.FrozenTrial]) -> float:
    span = trial_span(trials)
    if span is None:
        return 0.0
    return len(trials) / max((span[1] - span[0]).total_seconds(), 1e-9) * 60


class GpuSampler:
    """`nvidia-smi -lms` utilization and memory samples of one GPU, stamped on arrival, in a child process that
    is always ended (terminated, then killed) on leaving the `with` block."""

    def __init__(self, gpu: int, interval_ms: int, log_path: Path | None = None) -> None:
        self.command = ["nvidia-smi", "-i", str(gpu), "--query-gpu=utilization.gpu,memory.used",
                        "--format=csv,noheader,nounits", "-lms", str(interval_ms)]
        self.log_path = log_path
        self.samples: list[tuple[datetime, float, float]] = []
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.error: str | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            stdin=subprocess.DEVNULL, text=True)
        except OSError as error:
            self.error = f"nvidia-smi unavailable ({error.strerror or error})"
            return self
        self.thread = threading.Thread(target=self._read, name="nvidia-smi", daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        log = open(self.log_path, "a") if self.log_path else None
        try:
            for line in self.process.stdout:
                now = datetime.now()
                if log:
                    log.write(f"{now.isoformat(timespec='milliseconds')}, {line}")
                with contextlib.suppress(ValueError):
                    utilization, memory = (float(v) for v in line.split(",")[:2])
                    self.samples.append((now, utilization, memory))
        finally:
            if log:
                log.close()

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def busy(self, span: tuple[datetime, datetime] | None) -> tuple[float, float] | None:
        """(mean utilization %, highest memory MiB) of the samples within `span`; None without samples."""
        inside = [s for s in self.samples if span is None or span[0] <= s[0] <= span[1]]
        if not inside:
            return None
        return sum(s[1] for s in inside) / len(inside), max(s[2] for s in inside)


@contextlib.contextmanager
def sampling(gpu: int | None, interval_ms: int, log_path: Path | None) -> Iterator[GpuSampler | None]:
    if gpu is None:
        yield None
        return
    with GpuSampler(gpu, interval_ms, log_path) as sampler:
        yield sampler


@dataclass
class StorageUse:
    """What a worker's tiny trials spent in storage calls, per trial."""

    seconds: float  # in storage calls, from the worker's thread (the heartbeat thread's beats are not counted)
    cpu_seconds: float  # the worker thread's CPU time in them: less moved by other processes on the machine
    total: float  # the whole trial
    calls: dict[str, float]  # storage calls by method name
    call_cpu_seconds: dict[str, float]  # the worker thread's CPU time in them, by method name


def storage_use_per_trial(data_root: Path, trials: int) -> StorageUse:
    """In one process: a worker's tiny trials, with every call on the storage object it works on timed.

    The storage object every caller gets (`open_storage`'s wrapper) is timed, not Optuna's RDBStorage beneath
    it: that counts what goes through Optuna's cache and the retrying wrapper too, and every call, including
    the ones Optuna's cache makes to private methods of the RDBStorage (a parameter write, a trial's creation).
    """
    from search.pipeline import resolve_device
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update
    from search.worker import work

    from search.optuna_private import BaseHeartbeat

    spent = [0.0]
    calls: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/studies.db"
        storage = open_storage(url)
        settings = StudySettings("logreg", trials, pruner="none", space={"epochs": 1},
                                 data={"dataset": "imagefolder", "data_root": str(data_root), "val_fraction": 0.3,
                                       "split_seed": 0, "image_size": 16, "weights": None})
        create_or_update(storage, "logreg", settings)
        for name in {n for n in dir(optuna.storages.BaseStorage) + dir(BaseHeartbeat) if not n.startswith("__")}:
            method = getattr(storage, name, None)
            if not callable(method):
                continue

            def timed(*args, __method=method, __name=name, **kwargs):
                if threading.current_thread() is not threading.main_thread():  # the heartbeat thread
                    return __method(*args, **kwargs)
                started, started_cpu = time.perf_counter(), time.thread_time()
                try:
                    return __method(*args, **kwargs)
                finally:
                    spent[0] += time.perf_counter() - started
                    cpu[__name] += time.thread_time() - started_cpu
                    calls[__name] += 1

            setattr(storage, name, timed)
        started = time.perf_counter()
        work(storage, ["logreg"], resolve_device("cpu"), threading.Event(), log=lambda line: None,
             data_overrides={"cache_dir": Path(tmp) / "cache"})
        total = time.perf_counter() - started
    return StorageUse(spent[0] / trials, sum(cpu.values()) / trials, total / trials,
                      {name: n / trials for name, n in calls.most_common()},
                      {name: seconds / trials for name, seconds in cpu.most_common()})


def parse_counts(text: str, flag: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"{flag} takes worker counts like 1,2,4; got {text!r}")
    return counts


def throughput(args: argparse.Namespace, launch: Launch, data_root: Path, workdir: Path, cache: Path) -> None:
    counts = parse_counts(args.workers_per_gpu if launch.gpu is not None else args.workers,
                          "--workers-per-gpu" if launch.gpu is not None else "--workers")
    params = fixed_params(args.model, args.epochs)
    where = f"GPU {launch.gpu}, workers per GPU" if launch.gpu is not None else "CPU, workers"
    print(f"Part 1: {args.model} at {args.image_size}px on {data_root.name}, {args.epochs} epoch(s), {args.trials} "
          f"trials per run, no pruning, SQLite, --pack {args.pack}; {where}: {','.join(map(str, counts))}\n"
          f"  fixed: {' '.join(params)}; searched: lr, weight_decay, dropout", flush=True)
    rows, rates = [], []
    for workers in counts:
        run = workdir / f"workers-{workers}"
        with sampling(launch.gpu, args.sample_ms, run.parent / f"nvidia-smi-{workers}.csv") as sampler:
            wall = search(run, cache, data_root, args.model, args.trials, workers, launch, params, "none",
                          args.image_size, args.timeout, args.pack)
        trials = finished_trials(run, args.model)
        rate = steady_rate(trials)
        rates.append(rate)
        row = [str(workers), f"{len(trials)}/{args.trials}", f"{wall:.1f}", f"{rate:.1f}",
               f"{rate / rates[0]:.2f}x" if rates[0] else "-"]
        busy_text = ""
        if sampler is not None:
            busy = sampler.busy(trial_span(trials))
            row += [f"{busy[0]:.0f}" if busy else sampler.error or "no samples", f"{busy[1]:,.0f}" if busy else "-"]
            busy_text = f", GPU busy {busy[0]:.0f}%, {busy[1]:,.0f} MiB" if busy else f", GPU busy: {row[5]}"
        rows.append(row)
        print(f"  {workers} worker(s): {len(trials)} trials finished, {rate:.1f} trials/min, wall {wall:.1f}s"
              + busy_text, flush=True)
    print()
    print_table(["workers per GPU" if launch.gpu is not None else "workers", "finished", "wall s", "trials/min",
                 "vs first", *(["GPU busy %", "GPU memory MiB"] if launch.gpu is not None else [])], rows)


def pruning(args: argparse.Namespace, launch: Launch, workers: int, workdir: Path, cache: Path) -> None:
    if args.data_root is None or not args.data_root.is_dir():
        print(f"\nPart 3 skipped: no --data-root folder ({args.data_root})")
        return
    print(f"\nPart 3: pruning, {args.prune_model} at 32px on {args.data_root.name}, {args.prune_trials} trials, "
          f"{args.prune_epochs}-epoch budget, {workers} worker(s) (the two runs' samplers draw different settings)",
          flush=True)
    results = []
    for pruner in ("hyperband", "none"):
        run = workdir / f"prune-{pruner}"
        wall = search(run, cache, args.data_root, args.prune_model, args.prune_trials, workers, launch,
                      [f"epochs={args.prune_epochs}"], pruner, 32, args.timeout, args.pack)
        trials = finished_trials(run, args.prune_model)
        epochs = sum(len(TrialRecord.load(t).history) for t in trials)
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
        best = max((t.value for t in trials if t.value is not None), default=float("nan"))
        results.append((pruner, len(trials), pruned, epochs, best, wall))
    print_table(["pruner", "finished", "pruned", "epochs", "best val", "wall s"],
                [[p, str(f), str(n), str(e), f"{b:.2%}", f"{w:.1f}"] for p, f, n, e, b, w in results])
    if results[1][3] and results[1][5]:
        print(f"epochs trained with pruning / without: {results[0][3] / results[1][3]:.2f}; "
              f"wall time ratio {results[0][5] / results[1][5]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.search_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--workers", default="1,2", help="CPU: worker counts to compare (default 1,2)")
    parser.add_argument("--workers-per-gpu", default="1,2,4", help="CUDA: workers per GPU to compare (default 1,2,4)")
    parser.add_argument("--trials", type=int, help="trials per run (default 24 on the CPU, 16 on CUDA)")
    parser.add_argument("--model", help="model of part 1 (default logreg on the CPU, cnn on CUDA)")
    parser.add_argument("--epochs", type=int, help="epochs per trial in part 1 (default 1 on the CPU, 3 on CUDA)")
    parser.add_argument("--image-size", type=int, help="part 1 image side (default 16 on the CPU, 64 on CUDA)")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction,
                        help="part 1 on 16 synthetic images per class instead of --data-root "
                             "(default: tiny on the CPU, --data-root on CUDA)")
    data_root = os.environ.get(DATA_ROOT_ENV)
    parser.add_argument("--data-root", type=Path, default=Path(data_root) if data_root else None,
                        help=f"ImageFolder dataset for real trials (default ${DATA_ROOT_ENV})")
    parser.add_argument("--storage-trials", type=int, default=24,
                        help="tiny trials of part 2, storage time (default 24; 0 skips it)")
    parser.add_argument("--prune-trials", type=int, default=0, help="trials per pruning run of part 3 (default 0: skipped)")
    parser.add_argument("--prune-model", default="logreg", help="model of part 3 (default logreg)")
    parser.add_argument("--prune-epochs", type=int, default=10, help="epoch budget of part 3 (default 10)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one search may run before it is stopped")
    parser.add_argument("--pack", default="1", help="the searches' --pack (default 1: every trial alone, so that parts 1 "
                                                    "and 3 measure workers and storage; auto: trial packs)")
    parser.add_argument("--sample-ms", type=int, default=500, help="nvidia-smi sampling interval (default 500 ms)")
    parser.add_argument("--work-dir", type=Path,
                        help="keep every run's studies.db, search and worker logs here (default: a temporary folder)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # unwind: stop searches and nvidia-smi

    kind, _, index = args.device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--device takes cpu, cuda or cuda:N; got {args.device!r}")
    cuda = kind == "cuda"
    launch = Launch(int(index or 0) if cuda else None)
    args.model = args.model or ("cnn" if cuda else "logreg")
    args.epochs = args.epochs or (3 if cuda else 1)
    args.image_size = args.image_size or (64 if cuda else 16)
    args.trials = args.trials or (16 if cuda else 24)
    tiny_data = not cuda if args.tiny is None else args.tiny
    if not tiny_data and (args.data_root is None or not args.data_root.is_dir()):
        raise SystemExit(f"real trials need --data-root (or ${DATA_ROOT_ENV}); {args.data_root} is not a folder")

    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-throughput-")))
        else:
            workdir = args.work_dir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        cache = workdir / "cache"  # images decoded once for every run
        tiny = write_tiny_dataset(workdir / "tiny")
        throughput(args, launch, tiny if tiny_data else args.data_root, workdir, cache)

        if args.storage_trials > 0:
            use = storage_use_per_trial(tiny, args.storage_trials)
            print(f"\nPart 2: storage time per tiny trial (1 CPU worker, in process, {args.storage_trials} trials): "
                  f"{use.seconds * 1000:.1f} ms of {use.total * 1000:.0f} ms ({use.seconds / use.total:.0%}; CPU "
                  f"{use.cpu_seconds * 1000:.1f} ms), "
                  f"{sum(use.calls.values()):.1f} storage calls; per trial, calls (CPU ms) by method:\n  "
                  + ", ".join(f"{name} {n:.2g} ({use.call_cpu_seconds[name] * 1000:.1f})"
                              for name, n in use.calls.items() if n >= 0.1))
        if args.prune_trials > 0:
            workers = max(parse_counts(args.workers_per_gpu if cuda else args.workers, "--workers"))
            pruning(args, launch, workers, workdir, cache)


if __name__ == "__main__":
    main()

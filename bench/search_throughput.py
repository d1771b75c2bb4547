"""Search throughput on the CPU: trials per minute with 1 and 2 workers on SQLite, storage time per trial,
and what pruning saves for the same number of trials.

    python -m bench.search_throughput [--trials 24] [--prune-trials 12] [--data-root DIR]

Part 1 uses tiny trials (logistic regression, 16px synthetic images, 1 epoch) so that storage and process
overhead dominate. Part 2 runs a real small search (logistic regression, 32px, 10-epoch budget) on
--data-root (default $STL10_SEARCH_BENCH_DATA) once with Hyperband pruning and once without.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_dataset(root: Path, classes: int = 4, per_class: int = 16, size: int = 16) -> Path:
    for part, count in (("train", per_class), ("test", per_class // 2)):
        for c in range(classes):
            folder = root / part / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (size, size), (60 * c % 256, (i * 13) % 256, 128)).save(folder / f"{i}.png")
    return root


def search(workdir: Path, data_root: Path, trials: int, workers: int, params: list[str], pruner: str,
           image_size: int) -> float:
    """Run `stl10-search search` in a fresh folder; returns its wall seconds."""
    command = [sys.executable, "-m", "search.cli", "search", "--model", "logreg", "--n-trials", str(trials),
               "--workers", str(workers), "--dataset", "imagefolder", "--data-root", str(data_root),
               "--image-size", str(image_size), "--pruner", pruner, "--cache-dir", str(workdir / "cache"),
               "--storage", f"sqlite:///{workdir}/studies.db", "--log-dir", str(workdir / "logs")]
    for p in params:
        command += ["--param", p]
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - started


def finished_trials(workdir: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name="logreg", storage=f"sqlite:///{workdir}/studies.db")
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def steady_rate(trials: list[optuna.trial.FrozenTrial]) -> float:
    """Trials per minute from the first trial's start to the last one's end (process start-up excluded)."""
    start = min(t.datetime_start for t in trials)
    end = max(t.datetime_complete for t in trials)
    return len(trials) / max((end - start).total_seconds(), 1e-9) * 60


def storage_seconds_per_trial(data_root: Path, trials: int) -> tuple[float, float]:
    """In one process: seconds per trial spent in storage calls, and seconds per trial in all."""
    from search.pipeline import resolve_device
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update
    from search.worker import work

    spent = [0.0]
    depth = [0]  # storage methods call each other: time the outermost call only
    timed = ("get_", "set_", "create_", "record_", "_get", "check_", "read_", "get_n_trials", "get_all_trials")
    storage_class = optuna.storages.RDBStorage
    originals = {}
    for name in dir(storage_class):
        if name.startswith(timed) and callable(getattr(storage_class, name)) and name not in originals:
            originals[name] = getattr(storage_class, name)

            def wrapper(self, *args, __f=originals[name], **kwargs):
                if threading.current_thread() is not threading.main_thread():  # the heartbeat thread
                    return __f(self, *args, **kwargs)
                depth[0] += 1
                started = time.perf_counter()
                try:
                    return __f(self, *args, **kwargs)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        spent[0] += time.perf_counter() - started

            setattr(storage_class, name, wrapper)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/studies.db"
            storage = open_storage(url)
            settings = StudySettings("logreg", trials, pruner="none", space={"epochs": 1},
                                     data={"dataset": "imagefolder", "data_root": str(data_root), "val_fraction": 0.3,
                                           "split_seed": 0, "image_size": 16, "weights": None})
            create_or_update(storage, "logreg", settings)
            spent[0] = 0.0
            started = time.perf_counter()
            work(storage, ["logreg"], resolve_device("cpu"), threading.Event(), log=lambda line: None,
                 data_overrides={"cache_dir": Path(tmp) / "cache"})
            total = time.perf_counter() - started
    finally:
        for name, original in originals.items():
            setattr(storage_class, name, original)
    return spent[0] / trials, total / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24, help="tiny trials per throughput run")
    parser.add_argument("--prune-trials", type=int, default=12, help="trials per pruning comparison run")
    data_root = os.environ.get("STL10_SEARCH_BENCH_DATA")
    parser.add_argument("--data-root", type=Path, default=Path(data_root) if data_root else None,
                        help="ImageFolder data for the pruning comparison (default $STL10_SEARCH_BENCH_DATA)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_dataset(Path(tmp) / "tiny")
        print(f"Part 1: tiny trials (logreg, 16px, 1 epoch, {args.trials} trials per run), SQLite")
        rows = []
        for workers in (1, 2):
            workdir = Path(tmp) / f"w{workers}"
            workdir.mkdir()
            wall = search(workdir, tiny, args.trials, workers, ["epochs=1"], "none", 16)
            trials = finished_trials(workdir)
            rows.append((workers, len(trials), wall, steady_rate(trials)))
        print(f"{'workers':>7}  {'finished':>8}  {'wall s':>7}  {'trials/min':>10}  {'vs 1 worker':>11}")
        for workers, finished, wall, rate in rows:
            print(f"{workers:>7}  {finished:>8}  {wall:>7.1f}  {rate:>10.1f}  {rate / rows[0][3]:>10.2f}x")
        storage_s, trial_s = storage_seconds_per_trial(tiny, args.trials)
        print(f"storage time per trial (1 worker, in process): {storage_s * 1000:.0f} ms of {trial_s * 1000:.0f} ms "
              f"({storage_s / trial_s:.0%})")

        if args.data_root is None or not args.data_root.is_dir():
            print(f"Part 2 skipped: {args.data_root} not found")
            return
        print(f"\nPart 2: pruning, logreg at 32px on {args.data_root.name}, {args.prune_trials} trials, "
              "10-epoch budget, 2 workers, same seed")
        results = []
        for pruner in ("hyperband", "none"):
            workdir = Path(tmp) / f"p-{pruner}"
            workdir.mkdir()
            wall = search(workdir, args.data_root, args.prune_trials, 2, ["epochs=10"], pruner, 32)
            trials = finished_trials(workdir)
            epochs = sum(len(t.user_attrs.get("history", [])) for t in trials)
            pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
            best = max((t.value for t in trials if t.value is not None), default=float("nan"))
            results.append((pruner, len(trials), pruned, epochs, best, wall))
        print(f"{'pruner':>9}  {'finished':>8}  {'pruned':>6}  {'epochs':>6}  {'best val':>8}  {'wall s':>6}")
        for pruner, finished, pruned, epochs, best, wall in results:
            print(f"{pruner:>9}  {finished:>8}  {pruned:>6}  {epochs:>6}  {best:>8.2%}  {wall:>6.1f}")
        print(f"epochs trained with pruning / without: {results[0][3] / results[1][3]:.2f}; "
              f"wall time ratio {results[0][5] / results[1][5]:.2f}")


if __name__ == "__main__":
    main()

"""A worker process: pull trials of one or more studies from shared storage until their budgets are met.

Per trial it samples params, trains with the one loop, reports validation accuracy per epoch for pruning,
and stores its seed, curves, state and reason. Storage is touched once per epoch, never per batch.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import torch
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from data import ImageSet
from models import count_trainable
from search.errors import USER_ERRORS
from search.pipeline import DataConfig, load_parts, place, prepare
from search.spaces import resolve_params, suggest
from search.storage import budget_lock, with_retries
from search.studies import StudySettings, count_trials, load_for_work
from search.training import Diverged, EpochMetrics, make_optimizer, train

POLL_SECONDS = 2.0
MAX_CONSECUTIVE_FAILURES = 3


class StopRequested(Exception):
    """The worker was asked to stop (SIGTERM, Ctrl-C); raised at an epoch boundary."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"interrupted after epoch {epoch}; queued again")
        self.epoch = epoch


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    value: float | None
    reason: str


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat in a thread, so that if this process dies the trial is failed and re-run."""
    interval = storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                with_retries(lambda: storage.record_heartbeat(trial._trial_id))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrialRunner:
    """Runs one trial of a study on data already loaded on the device."""

    def __init__(self, study: optuna.Study, settings: StudySettings, parts: dict[str, ImageSet],
                 config: DataConfig, device: torch.device, stop: threading.Event,
                 checkpoint_dir: Path | None = None) -> None:
        self.study, self.settings, self.parts, self.config = study, settings, parts, config
        self.device, self.stop, self.checkpoint_dir = device, stop, checkpoint_dir
        self.dims = settings.dims()

    def checkpoint_path(self, first_number: int) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        return self.checkpoint_dir / self.study.study_name / f"trial-{first_number}.pt"

    def run(self, trial: optuna.Trial) -> Outcome:
        history: list[dict[str, float]] = []
        try:
            return self._run(trial, history)
        except optuna.TrialPruned as pruned:
            return Outcome(TrialState.PRUNED, None, str(pruned))
        except Diverged as diverged:
            return Outcome(TrialState.PRUNED, None, str(diverged))
        except torch.OutOfMemoryError as error:
            free_device_memory()
            return Outcome(TrialState.FAIL, None, f"out of memory: {str(error).splitlines()[0]}")
        except USER_ERRORS as error:
            return Outcome(TrialState.FAIL, None, f"invalid parameters: {error}")
        except StopRequested:
            raise
        except Exception as error:  # a failed trial must not stop the worker; its reason is stored
            traceback.print_exc()
            return Outcome(TrialState.FAIL, None, f"failed: {error.__class__.__name__}: {error}")
        finally:
            with contextlib.suppress(Exception):  # also when the trial was already failed as stale
                with_retries(lambda: trial.set_user_attr("history", history))

    def _run(self, trial: optuna.Trial, history: list[dict[str, float]]) -> Outcome:
        params = resolve_params(self.settings.family, suggest(trial, self.dims))
        seed = int(trial.user_attrs.get("seed", self.settings.seed + trial.number))
        first_number = int(trial.user_attrs.get("first_number", trial.number))
        for key, value in {"seed": seed, "first_number": first_number, "params": params,
                           "worker": f"{socket.gethostname()}:{os.getpid()}", "device": str(self.device)}.items():
            with_retries(lambda: trial.set_user_attr(key, value))
        model, trained, source = prepare(self.settings.family, params, self.parts, self.config, self.device, seed)
        with_retries(lambda: trial.set_user_attr("trainable_parameters", count_trainable(model)))
        optimizer = make_optimizer(trained, params)
        first_epoch = self._resume(trial, trained, optimizer, first_number, history)
        epochs = int(params["epochs"])
        checkpoint = self.checkpoint_path(first_number)

        def on_epoch(metrics: EpochMetrics) -> None:
            history.append(metrics.as_dict())
            with_retries(lambda: trial.report(metrics.val_accuracy, metrics.epoch))
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": trained.state_dict(), "optimizer": optimizer.state_dict(), "history": history},
                           checkpoint.with_suffix(".tmp"))
                checkpoint.with_suffix(".tmp").replace(checkpoint)
            if metrics.epoch < epochs and with_retries(trial.should_prune):  # a finished run is kept
                raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}: validation accuracy "
                                         f"{metrics.val_accuracy:.2%}")
            if self.stop.is_set() and metrics.epoch < epochs:
                raise StopRequested(metrics.epoch)

        if first_epoch <= epochs:
            train(trained, source, params, self.device, on_epoch=on_epoch, first_epoch=first_epoch, optimizer=optimizer)
        best = max(history, key=lambda h: h["val_accuracy"])
        with_retries(lambda: trial.set_user_attr("best_epoch", int(best["epoch"])))
        return Outcome(TrialState.COMPLETE, best["val_accuracy"], f"completed {epochs} epochs; best at epoch "
                                                                   f"{int(best['epoch'])}")

    def _resume(self, trial: optuna.Trial, trained: torch.nn.Module, optimizer: torch.optim.Optimizer,
                first_number: int, history: list[dict[str, float]]) -> int:
        """Continue a re-run trial from its last checkpointed epoch, re-reporting the epochs done."""
        path = self.checkpoint_path(first_number)
        if path is None or not path.is_file():
            return 1
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            trained.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, OSError, EOFError, KeyError, ValueError):
            return 1  # an unreadable checkpoint: start over
        history.extend(state["history"])
        for row in history:
            with_retries(lambda: trial.report(row["val_accuracy"], int(row["epoch"])))
        return int(history[-1]["epoch"]) + 1 if history else 1


@contextlib.contextmanager
def _unless_already_finished(log: Callable[[str], None], trial: optuna.Trial) -> Iterator[None]:
    """A slow worker's trial may have been failed by another worker's heartbeat check (and re-queued)."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        log(f"[#{trial.number}] was already failed as stale (missed heartbeats) and queued again; result dropped")


def _tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
    with_retries(lambda: trial.set_user_attr("reason", outcome.reason))
    if outcome.state == TrialState.COMPLETE:
        with_retries(lambda: study.tell(trial, outcome.value))
    else:
        with_retries(lambda: study.tell(trial, state=outcome.state))


def _requeue(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail an interrupted trial with its reason and queue the same params and seed to run again."""
    with_retries(lambda: trial.set_user_attr("reason", reason))
    with_retries(lambda: study.tell(trial, state=TrialState.FAIL))
    attrs = {k: v for k, v in trial.user_attrs.items() if k in ("seed", "first_number", "reference")}
    with_retries(lambda: study.enqueue_trial(trial.params, user_attrs={**attrs, "retry_of": trial.number}))


def work(
    storage: optuna.storages.BaseStorage,
    url: str,
    study_names: list[str],
    device: torch.device,
    stop: threading.Event,
    *,
    data_overrides: dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    log: Callable[[str], None] = print,
    seed_offset: int | None = None,
) -> dict[str, int]:
    """Run trials of each study in turn until its budget of finished trials is met or `stop` is set.

    Returns the number of trials this worker finished per study.
    """
    done: dict[str, int] = {}
    for name in study_names:
        study, settings = load_for_work(storage, name, seed_offset)
        config = settings.data_config(**(data_overrides or {}))
        runner: TrialRunner | None = None
        done[name] = failures = 0
        while not stop.is_set():
            with contextlib.suppress(Exception):
                with_retries(lambda: optuna.storages.fail_stale_trials(study))
            if runner is None:
                if count_trials(storage, study).finished >= settings.n_trials:
                    break
                log(f"[{name}] loading {config.dataset} at {config.size_for(settings.family)}px on {device}")
                parts = place(load_parts(config, settings.family), device)
                runner = TrialRunner(study, settings, parts, config, device, stop, checkpoint_dir)
            with budget_lock(storage, url, name):
                counts = count_trials(storage, study)
                trial = with_retries(study.ask) if counts.committed < settings.n_trials else None
            if counts.finished >= settings.n_trials:
                break
            if trial is None:
                time.sleep(POLL_SECONDS)  # the rest is running elsewhere; stay to re-run it if a worker dies
                continue
            started = time.perf_counter()
            try:
                with heartbeat(storage, trial):
                    outcome = runner.run(trial)
            except StopRequested as stopped:
                with _unless_already_finished(log, trial):
                    _requeue(study, trial, str(stopped))
                log(f"[{name} #{trial.number}] {stopped}")
                break
            except BaseException:
                with _unless_already_finished(log, trial):
                    _requeue(study, trial, "worker stopped during the trial; queued again")
                raise
            with _unless_already_finished(log, trial):
                _tell(study, trial, outcome)
            log(f"[{name} #{trial.number}] {outcome.state.name.lower()}"
                + (f" {outcome.value:.2%}" if outcome.value is not None else "")
                + f" ({outcome.reason}; {time.perf_counter() - started:.1f}s)")
            if outcome.state == TrialState.FAIL:
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    log(f"[{name}] {failures} trials in a row failed; this worker leaves the study (see reasons)")
                    break
            else:
                failures = 0
                done[name] += 1
        if stop.is_set():
            break
    return done

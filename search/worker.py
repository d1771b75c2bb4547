"""A worker process: pull trials of one or more studies from shared storage until their budgets are met.

Per trial it samples params, runs them through the one trial runner, reports validation accuracy per epoch
for pruning, and stores its seed, curves, state and reason. Storage is touched once per epoch, never per batch.
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
from optuna.trial import TrialState

from data import DataError, ImageSet
from models import count_trainable
from search.errors import USER_ERRORS, StorageUnavailable
from search.pipeline import DataConfig, load_parts, place
from search.space import suggest
from search.storage import budget_lock
from search.provenance import provenance
from search.records import TrialRecord
from search.studies import DATA_ATTR, ENDED_ATTR, StudySettings, count_trials, deadline_of, load_for_work, trial_seed
from search.trackers import Tracker, Trackers
from search.trial import Checkpoint, Interrupted, run_trial
from search.training import Diverged, EpochMetrics

POLL_SECONDS = 2.0
MAX_CONSECUTIVE_FAILURES = 3


class StopRequested(Interrupted):
    """The worker was asked to stop (SIGTERM, Ctrl-C); raised at an epoch boundary."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"interrupted after epoch {epoch}; queued again")
        self.epoch = epoch


class ClockStopped(Exception):
    """The study's deadline passed: the trial ends at this epoch boundary as a result at fewer epochs."""

    def __init__(self, epoch: int, epochs: int) -> None:
        super().__init__(f"time budget: stopped after epoch {epoch} of {epochs} at the study's deadline")


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    value: float | None
    reason: str


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, study_id: int, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat in a thread, so that if this process dies the trial is failed and re-run."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def stale_check_interval(storage: optuna.storages.BaseStorage) -> float:
    """Seconds between two looks for the trials of dead workers (failed, then queued again): the heartbeat interval.

    A trial turns stale only after it missed its beats for the whole grace period, so looking before every trial
    (a query each time) finds nothing more: a dead worker's trial is still failed and queued again at most one
    interval after its grace period ends. Without heartbeats there is nothing to look for.
    """
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    return float(interval or POLL_SECONDS)


def free_device_memory() -> None:
    """Give the GPU memory of a trial that ran out of it back to the other workers on the GPU; call it once nothing
    (no traceback either) refers to the trial's objects any more."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StudyWork:
    """One study's trials on this worker: data loaded once per image size and kept on the device."""

    def __init__(self, study: optuna.Study, settings: StudySettings, config: DataConfig, device: torch.device,
                 stop: threading.Event, checkpoint_dir: Path | None, log: Callable[[str], None],
                 trackers: Tracker) -> None:
        self.study, self.settings, self.config = study, settings, config
        self.device, self.stop, self.checkpoint_dir, self.log = device, stop, checkpoint_dir, log
        self.trackers = trackers
        self.family = settings.model_family()
        self.dims = settings.dims()
        self._parts: dict[int, dict[str, ImageSet]] = {}

    def parts(self, size: int) -> dict[str, ImageSet]:
        """The data at `size`; a DataError when it is not the data the study was created on."""
        if size not in self._parts:
            self.log(f"[{self.study.study_name}] loading {self.config.dataset} at {size}px on {self.device}")
            expect = self.study.user_attrs.get(DATA_ATTR)
            self._parts[size] = place(load_parts(self.config, size, expect=expect), self.device)
        return self._parts[size]

    def checkpoint(self, first_number: int, params: dict[str, Any], seed: int) -> Checkpoint | None:
        if self.checkpoint_dir is None:
            return None
        folder = self.checkpoint_dir / f"{self.study.study_name}-{self.settings.uid[:12]}"
        identity = dict(study=self.settings.uid, trial=first_number, params=params, seed=seed)
        return Checkpoint(folder / f"trial-{first_number}.pt", identity)

    def run(self, trial: optuna.Trial, record: TrialRecord, deadline: float | None = None) -> Outcome:
        """Run one trial, filling `record` as it goes; at `deadline` (UTC seconds) it stops at its next epoch
        boundary as a result at fewer epochs."""
        out_of_memory = False
        try:
            return self._run(trial, record, deadline)
        except optuna.TrialPruned as pruned:
            return Outcome(TrialState.PRUNED, None, str(pruned))
        except ClockStopped as stopped:
            return self._completed(record, str(stopped))
        except Diverged as diverged:
            return Outcome(TrialState.PRUNED, None, str(diverged))
        except torch.OutOfMemoryError as error:
            out_of_memory = True
            return Outcome(TrialState.FAIL, None, f"out of memory: {str(error).splitlines()[0]}")
        except DataError:
            raise  # not this setting's fault: the worker leaves the study, the trial is queued again
        except StorageUnavailable:
            raise  # damaged, read-only or full: the worker stops, its trial is run again (queued, or when stale)
        except USER_ERRORS as error:
            return Outcome(TrialState.FAIL, None, f"invalid parameters: {error}")
        except StopRequested:
            raise
        except Exception as error:  # a failed trial must not stop the worker; its reason is stored
            traceback.print_exc()
            return Outcome(TrialState.FAIL, None, f"failed: {error.__class__.__name__}: {error}")
        finally:
            if out_of_memory:  # here, not in `except`, whose traceback holds the trial's model, optimizer and graph
                free_device_memory()

    def _run(self, trial: optuna.Trial, record: TrialRecord, deadline: float | None) -> Outcome:
        params = self.family.relevant({**self.family.resolve(), **suggest(trial, self.dims)})
        self.family.validate(params)
        record.params, record.seed = params, trial_seed(self.settings, record, trial.number)
        record.worker, record.device = f"{socket.gethostname()}:{os.getpid()}", str(self.device)
        record.threads, record.provenance = torch.get_num_threads(), provenance().host()
        record.save(trial)  # what the trial runs with, before it runs: one storage write
        self.trackers.trial_started(self.study.study_name, trial.number, params)
        epochs = int(params["epochs"])

        def on_start(model: torch.nn.Module, source: Any) -> None:
            record.trainable_parameters = count_trainable(model)

        def on_epoch(metrics: EpochMetrics) -> None:
            record.history.append(metrics)
            self.trackers.epoch(self.study.study_name, trial.number, metrics)
            trial.report(metrics.val_accuracy, metrics.epoch)
            if metrics.epoch < epochs and trial.should_prune():  # a finished run is kept
                raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}: validation accuracy "
                                         f"{metrics.val_accuracy:.2%}")
            if deadline is not None and metrics.epoch < epochs and time.time() >= deadline:
                raise ClockStopped(metrics.epoch, epochs)
            if self.stop.is_set() and metrics.epoch < epochs:
                raise StopRequested(metrics.epoch)

        parts = self.parts(self.family.size_for(params, self.config.image_size))
        checkpoint = self.checkpoint(record.first_number, params, record.seed)
        try:
            run_trial(self.family, params, parts, self.config, self.device, record.seed, on_epoch=on_epoch,
                      on_start=on_start, checkpoint=checkpoint)
        finally:
            if checkpoint is not None and checkpoint.restored_epochs:
                record.resumed_after_epoch = checkpoint.restored_epochs
        return self._completed(record, f"completed {epochs} epochs")

    @staticmethod
    def _completed(record: TrialRecord, how: str) -> Outcome:
        """A trial that ran to its end, or to the deadline: its value is its best epoch's validation accuracy."""
        best = record.best
        record.best_epoch = best.epoch
        return Outcome(TrialState.COMPLETE, best.val_accuracy, f"{how}; best at epoch {best.epoch}")


@contextlib.contextmanager
def _unless_already_finished(log: Callable[[str], None], trial: optuna.Trial) -> Iterator[None]:
    """A slow worker's trial may have been failed by another worker's heartbeat check (and re-queued)."""
    try:
        yield
    except optuna.exceptions.UpdateFinishedTrialError:
        log(f"[#{trial.number}] was already failed as stale (missed heartbeats) and queued again; result dropped")


def _tell(study: optuna.Study, trial: optuna.Trial, record: TrialRecord, outcome: Outcome, seconds: float) -> None:
    """Store the finished trial's record (one write), then its state and value."""
    record.reason, record.seconds = outcome.reason, seconds
    record.save(trial)
    if outcome.state == TrialState.COMPLETE:
        study.tell(trial, outcome.value)
    else:
        study.tell(trial, state=outcome.state)


def _requeue(study: optuna.Study, trial: optuna.Trial, record: TrialRecord, reason: str) -> None:
    """Fail an interrupted trial with its reason and queue the same params and seed to run again."""
    record.reason = reason
    record.save(trial)
    study.tell(trial, state=TrialState.FAIL)
    again = TrialRecord(seed=record.seed, first_number=record.first_number, reference=record.reference,
                        warm_start=record.warm_start, retry_of=trial.number)
    study.enqueue_trial(trial.params, user_attrs=again.user_attrs())


def work(
    storage: optuna.storages.BaseStorage,
    study_names: list[str],
    device: torch.device,
    stop: threading.Event,
    *,
    data_overrides: dict[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    log: Callable[[str], None] = print,
    seed_offset: int | None = None,
    trackers: Tracker | None = None,
) -> dict[str, int]:
    """Run trials of each study in turn until its budget of finished trials is met or `stop` is set.

    Each trial's params, curves, state and reason also go to `trackers` (experiment trackers), which never fail
    a trial. Returns the number of trials this worker finished per study.
    """
    trackers = trackers or Trackers({}, log)
    done: dict[str, int] = {}
    for name in study_names:
        study, settings = load_for_work(storage, name, seed_offset)
        study_id = storage.get_study_id_from_name(name)  # fixed for the study's life: looked up once
        config = settings.data_config(**(data_overrides or {}))
        runner: StudyWork | None = None
        done[name] = failures = 0
        budget = settings.n_trials
        next_stale_check = 0.0
        while not stop.is_set():
            if time.perf_counter() >= next_stale_check:
                with contextlib.suppress(Exception):
                    optuna.storages.fail_stale_trials(study)
                next_stale_check = time.perf_counter() + stale_check_interval(storage)
            deadline = deadline_of(storage, study_id)
            if deadline is not None and time.time() >= deadline:
                study.set_user_attr(ENDED_ATTR, "time budget reached")
                log(f"[{name}] time budget reached; no new trial starts")
                break
            with budget_lock(storage, name):
                counts = count_trials(storage, study_id)
                full = budget is not None and counts.finished >= budget
                trial = study.ask() if not full and (budget is None or counts.committed < budget) else None
            if full:
                study.set_user_attr(ENDED_ATTR, f"trial budget met ({counts.finished} finished)")
                break
            if trial is None:
                time.sleep(POLL_SECONDS)  # the rest is running elsewhere; stay to re-run it if a worker dies
                continue
            runner = runner or StudyWork(study, settings, config, device, stop, checkpoint_dir, log, trackers)
            record = TrialRecord.load(trial).queued(trial.number)  # what it was queued with, if anything
            started = time.perf_counter()
            try:
                with heartbeat(storage, study_id, trial):
                    outcome = runner.run(trial, record, deadline)
            except StopRequested as stopped:
                with _unless_already_finished(log, trial):
                    _requeue(study, trial, record, str(stopped))
                trackers.trial_finished(name, trial.number, "fail", None, str(stopped))
                log(f"[{name} #{trial.number}] {stopped}")
                break
            except DataError as error:
                with _unless_already_finished(log, trial):
                    _requeue(study, trial, record, f"not run: {error}")
                trackers.trial_finished(name, trial.number, "fail", None, f"not run: {error}")
                study.set_user_attr(ENDED_ATTR, f"worker left: {error}")
                log(f"[{name}] this worker leaves the study: {error}")
                break
            except BaseException:
                with _unless_already_finished(log, trial):
                    _requeue(study, trial, record, "worker stopped during the trial; queued again")
                raise
            seconds = time.perf_counter() - started
            with _unless_already_finished(log, trial):
                _tell(study, trial, record, outcome, seconds)
            trackers.trial_finished(name, trial.number, outcome.state.name.lower(), outcome.value, outcome.reason)
            log(f"[{name} #{trial.number}] {outcome.state.name.lower()}"
                + (f" {outcome.value:.2%}" if outcome.value is not None else "")
                + f" ({outcome.reason}; {seconds:.1f}s)")
            if outcome.state == TrialState.FAIL:
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    study.set_user_attr(ENDED_ATTR, f"{failures} trials in a row failed (see their reasons)")
                    log(f"[{name}] {failures} trials in a row failed; this worker leaves the study (see reasons)")
                    break
            else:
                failures = 0
                done[name] += 1
        if stop.is_set():
            break
    return done

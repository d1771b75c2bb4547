"""A worker process: pull trials of one or more studies from shared storage until their budgets are met.

Per trial it samples params, runs them through the one trial runner, reports validation accuracy per epoch
for pruning, and stores its seed, curves, state and reason. Storage is touched once per epoch, never per batch.

Trial packs (`search.pack`): after sampling a trial (the leader) the worker asks for more trials whose shared
parameters (`Family.pack_shared`) are fixed to the leader's, with Optuna's PartialFixedSampler around the
study's sampler so that it still chooses the rest, and trains them as one stacked model on the leader's batch
stream (its seed is their data seed). Each member stays its own Optuna trial: its own params, seed, reports,
pruning, state and record, which names the pack and the data seed. Members are counted against the budget as
they are asked for, under the same lock as a solo trial. A queued trial (a re-run, a warm start, the reference
setting) is never packed with sampled ones; the members of a stopped pack are queued again together and re-run
as that pack, from its checkpoint when there is one.
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
from search.pack import Member, pack_size, run_pack
from search.pack.size import packable_model
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
def heartbeat(storage: optuna.storages.BaseStorage, study_id: int, trials: list[optuna.Trial]) -> Iterator[None]:
    """Record the trials' heartbeats in one thread, so that if this process dies they are failed and re-run."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()
    trial_ids = [storage.get_trial_id_from_study_id_trial_number(study_id, trial.number) for trial in trials]

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                    storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trials[0].number}", daemon=True)
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


LEAVES_THE_STUDY = (DataError, StorageUnavailable, StopRequested)
"""Errors that are not the trial's fault: its trial is queued again, and the worker leaves the study or stops."""


@dataclass
class Running:
    """A trial this worker started, and its record (filled as it runs)."""

    trial: optuna.Trial
    record: TrialRecord


class StudyWork:
    """One study's trials on this worker: data loaded once per image size and kept on the device."""

    def __init__(self, study: optuna.Study, settings: StudySettings, config: DataConfig, device: torch.device,
                 stop: threading.Event, checkpoint_dir: Path | None, log: Callable[[str], None],
                 trackers: Tracker, pack: int | None = 1) -> None:
        self.study, self.settings, self.config = study, settings, config
        self.device, self.stop, self.checkpoint_dir, self.log = device, stop, checkpoint_dir, log
        self.trackers = trackers
        self.family = settings.model_family()
        self.dims = settings.dims()
        self.pack = pack  # members per pack: None picks it (search.pack.pack_size), 1 trains every trial alone
        self._parts: dict[int, dict[str, ImageSet]] = {}
        self._pack_sizes: dict[str, int] = {}

    def parts(self, size: int) -> dict[str, ImageSet]:
        """The data at `size`; a DataError when it is not the data the study was created on."""
        if size not in self._parts:
            self.log(f"[{self.study.study_name}] loading {self.config.dataset} at {size}px on {self.device}")
            expect = self.study.user_attrs.get(DATA_ATTR)
            self._parts[size] = place(load_parts(self.config, size, expect=expect), self.device)
        return self._parts[size]

    def folder(self) -> Path:
        return self.checkpoint_dir / f"{self.study.study_name}-{self.settings.uid[:12]}"

    def checkpoint(self, record: TrialRecord) -> Checkpoint | None:
        if self.checkpoint_dir is None:
            return None
        identity = dict(study=self.settings.uid, trial=record.first_number, params=record.params, seed=record.seed)
        if record.data_seed is not None:
            identity["data_seed"] = record.data_seed
        return Checkpoint(self.folder() / f"trial-{record.first_number}.pt", identity)

    def pack_checkpoint(self, leader: TrialRecord) -> Checkpoint | None:
        """One file per pack; it holds which members it was made by (`search.pack.StackedLearner.identity`)."""
        if self.checkpoint_dir is None:
            return None
        identity = dict(study=self.settings.uid, pack=leader.pack_id, data_seed=leader.data_seed)
        return Checkpoint(self.folder() / f"pack-{leader.pack_id}.pt", identity)

    def start(self, trial: optuna.Trial, record: TrialRecord) -> None:
        """Sample the trial's params and store what it runs with, before it runs (one storage write); a
        USER_ERRORS error when the setting fails the family's checks."""
        params = self.family.relevant({**self.family.resolve(), **suggest(trial, self.dims)})
        self.family.validate(params)
        record.params, record.seed = params, trial_seed(self.settings, record, trial.number)
        record.worker, record.device = f"{socket.gethostname()}:{os.getpid()}", str(self.device)
        record.threads, record.provenance = torch.get_num_threads(), provenance().host()
        record.save(trial)
        self.trackers.trial_started(self.study.study_name, trial.number, params)

    def pack_size(self, params: dict[str, Any]) -> int:
        """How many members a pack led by `params` holds: `--pack`, or picked per shared setting (`pack_size`);
        1 where the family cannot pack or the device computes in fp16 (`packable_model`)."""
        if self.pack == 1 or not self.family.pack_members:
            return 1
        key = repr(sorted(self.family.pack_shared(params).items()))
        if key not in self._pack_sizes:
            size = self.pack
            if size is None:
                parts = self.parts(self.family.size_for(params, self.config.image_size))
                size = pack_size(self.family, self.device, params, parts, self.config)
            elif packable_model(self.family, self.device, params,
                                self.family.size_for(params, self.config.image_size)) is None:
                self.log(f"[{self.study.study_name}] {self.family.name} trains alone here: --pack {size} needs a "
                         "network that stacks (see models.stacked) on a device computing in bf16 or fp32")
                size = 1
            self._pack_sizes[key] = size
        return self._pack_sizes[key]

    def outcome(self, error: Exception, record: TrialRecord) -> Outcome:
        """What became of a trial that ended by `error` (not one of LEAVES_THE_STUDY)."""
        if isinstance(error, (optuna.TrialPruned, Diverged)):
            return Outcome(TrialState.PRUNED, None, str(error))
        if isinstance(error, ClockStopped):
            return self._completed(record, str(error))
        if isinstance(error, torch.OutOfMemoryError):
            return Outcome(TrialState.FAIL, None, f"out of memory: {str(error).splitlines()[0]}")
        if isinstance(error, USER_ERRORS):
            return Outcome(TrialState.FAIL, None, f"invalid parameters: {error}")
        traceback.print_exception(error)  # a failed trial must not stop the worker; its reason is stored
        return Outcome(TrialState.FAIL, None, f"failed: {error.__class__.__name__}: {error}")

    def run(self, runs: list[Running], deadline: float | None = None) -> list[Outcome | Exception]:
        """Run the trials, alone or as one pack, filling their records as they go; at `deadline` (UTC seconds) they
        stop at their next epoch boundary as results at fewer epochs. One outcome per trial, or the error (one of
        LEAVES_THE_STUDY) that ended it without being its fault."""
        out_of_memory = False
        try:
            return self._run(runs, deadline)
        except LEAVES_THE_STUDY as error:
            return [error] * len(runs)
        except Exception as error:  # noqa: BLE001 - the pack or trial as a whole failed
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
            return [self.outcome(error, run.record) for run in runs]
        finally:
            if out_of_memory:  # here, not in `except`, whose traceback holds the trial's model, optimizer and graph
                free_device_memory()

    def _run(self, runs: list[Running], deadline: float | None) -> list[Outcome | Exception]:
        for run in runs:
            if run.record.params is None:
                self.start(run.trial, run.record)
        leader = runs[0].record
        epochs = int(leader.params["epochs"])
        parts = self.parts(self.family.size_for(leader.params, self.config.image_size))

        def on_start(model: torch.nn.Module, source: Any) -> None:
            for run in runs:
                run.record.trainable_parameters = count_trainable(model)

        if len(runs) == 1 and leader.pack_id is None:
            checkpoint = self.checkpoint(leader)
            try:
                run_trial(self.family, leader.params, parts, self.config, self.device, leader.seed,
                          on_epoch=self._on_epoch(runs[0], epochs, deadline), on_start=on_start,
                          checkpoint=checkpoint, data_seed=leader.data_seed)
            finally:
                if checkpoint is not None and checkpoint.restored_epochs:
                    leader.resumed_after_epoch = checkpoint.restored_epochs
            return [self._completed(leader, f"completed {epochs} epochs")]
        members = [Member(run.record.params, run.record.seed, self._on_epoch(run, epochs, deadline)) for run in runs]
        checkpoint = self.pack_checkpoint(leader)
        results = run_pack(self.family, members, parts, self.config, self.device, leader.data_seed,
                           on_start=on_start, checkpoint=checkpoint)
        if checkpoint is not None and checkpoint.restored_epochs:
            for run in runs:
                run.record.resumed_after_epoch = checkpoint.restored_epochs
        outcomes: list[Outcome | Exception] = []
        for run, result in zip(runs, results):
            if result.error is None:
                outcomes.append(self._completed(run.record, f"completed {epochs} epochs"))
            elif isinstance(result.error, LEAVES_THE_STUDY):
                outcomes.append(result.error)
            else:
                outcomes.append(self.outcome(result.error, run.record))
        if any(isinstance(result.error, torch.OutOfMemoryError) for result in results):
            del results
            free_device_memory()
        return outcomes

    def _on_epoch(self, run: Running, epochs: int, deadline: float | None) -> Callable[[EpochMetrics], None]:
        """Where a trial's epochs go: its record, the trackers, its Optuna trial (for pruning); it raises to end
        the trial at this epoch boundary (pruned, the study's deadline, a stop request)."""
        trial, record = run.trial, run.record

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

        return on_epoch

    def followers(self, leader: Running, budget: int | None, storage: optuna.storages.BaseStorage,
                  study_id: int) -> list[Running]:
        """The other members of the pack `leader` leads, asked for under the budget lock: those of its stopped
        pack queued again with it, or new trials sampled with its shared params fixed; none when it trains alone
        (its pack size is 1, or it is a queued trial of no pack)."""
        if leader.record.pack_id is not None:
            return self._queued_members(leader, storage, study_id)
        queued = leader.record.reference or leader.record.warm_start or leader.record.retry_of is not None
        if leader.record.params is None or queued:
            return []  # its setting failed its checks, or it was queued: a re-run, a warm start, the reference
        size = self.pack_size(leader.record.params)
        if size <= 1:
            return []
        with budget_lock(storage, self.study.study_name):
            counts = count_trials(storage, study_id)
            room = size - 1 if budget is None else min(size - 1, budget - counts.committed)
            if counts.waiting or room <= 0:
                return []  # queued trials go first, alone
            record = leader.record
            record.pack_id, record.pack_size, record.data_seed = record.first_number, room + 1, record.seed
            record.save(leader.trial)
            shared = {name: value for name, value in self.family.pack_shared(record.params).items()
                      if name in leader.trial.params}
            sampler = self.study.sampler
            self.study.sampler = optuna.samplers.PartialFixedSampler(shared, sampler)
            members: list[Running] = []
            try:
                with self._queued_again_on_error(members):
                    for _ in range(room):  # one at a time: the constant liar then sees the members before it
                        trial = self.study.ask()
                        members.append(Running(trial, TrialRecord(first_number=trial.number, pack_id=record.pack_id,
                                                                  pack_size=record.pack_size,
                                                                  data_seed=record.data_seed)))
                        self._start_member(members[-1], record)
            finally:
                self.study.sampler = sampler
        return members

    @contextlib.contextmanager
    def _queued_again_on_error(self, members: list[Running]) -> Iterator[None]:
        """Members asked for before an error (a storage fault, Ctrl-C) are queued again, not left running: they
        have no heartbeat yet, so no other worker would ever find them stale."""
        try:
            yield
        except BaseException:
            for member in members:
                with contextlib.suppress(Exception):
                    _requeue(self.study, member.trial, member.record, "worker stopped while forming its pack; "
                             "queued again")
            raise

    def _start_member(self, member: Running, leader: TrialRecord) -> None:
        """Sample a follower (a failed check leaves its params None: it fails alone, before the pack runs); one
        whose shared params differ from the leader's (a shared dimension that depends on a member's) stays out
        of the pack too, and runs alone."""
        with contextlib.suppress(*USER_ERRORS):
            self.start(member.trial, member.record)
        if (member.record.params is not None
                and self.family.pack_shared(member.record.params) != self.family.pack_shared(leader.params)):
            member.record.pack_id = member.record.pack_size = member.record.data_seed = None
            member.record.save(member.trial)

    def _queued_members(self, leader: Running, storage: optuna.storages.BaseStorage, study_id: int) -> list[Running]:
        """The waiting trials of the leader's pack, queued with it when that pack stopped, in their order."""
        members: list[Running] = []
        with self._queued_again_on_error(members):
            with budget_lock(storage, self.study.study_name):
                while True:
                    waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
                    if not waiting or TrialRecord.load(waiting[0]).pack_id != leader.record.pack_id:
                        break
                    trial = self.study.ask()  # pops the first waiting trial
                    members.append(Running(trial, TrialRecord.load(trial).queued(trial.number)))
            for member in members:
                self._start_member(member, leader.record)
        return members

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
    """Fail an interrupted trial with its reason and queue the same params, seed and pack to run again."""
    record.reason = reason
    record.save(trial)
    study.tell(trial, state=TrialState.FAIL)
    again = TrialRecord(seed=record.seed, first_number=record.first_number, reference=record.reference,
                        warm_start=record.warm_start, retry_of=trial.number, data_seed=record.data_seed,
                        pack_id=record.pack_id, pack_size=record.pack_size)
    study.enqueue_trial(trial.params, user_attrs=again.user_attrs())


def _in_pack(leader: Running, followers: list[Running]) -> tuple[list[Running], list[Running]]:
    """(the pack, trials that run alone): a follower whose setting failed its checks or left the pack runs alone;
    a pack of one is no pack."""
    pack = [leader] + [f for f in followers if f.record.params is not None and f.record.pack_id is not None]
    alone = [f for f in followers if f not in pack]
    if len(pack) == 1 and leader.record.retry_of is None:  # a new pack whose followers all ran alone
        leader.record.pack_id = leader.record.pack_size = None
    for run in pack if len(pack) > 1 else []:
        run.record.pack_size = len(pack)
    return pack, alone


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
    pack: int | None = 1,
) -> dict[str, int]:
    """Run trials of each study in turn until its budget of finished trials is met or `stop` is set.

    `pack` members train as one stacked model where the family allows it (None: as many as pay on the device, see
    `search.pack.pack_size`; 1: every trial alone). Each trial's params, curves, state and reason also go to
    `trackers` (experiment trackers), which never fail a trial. Returns the number of trials this worker finished
    per study.
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
        leave = False
        while not stop.is_set() and not leave:
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
            runner = runner or StudyWork(study, settings, config, device, stop, checkpoint_dir, log, trackers, pack)
            leader = Running(trial, TrialRecord.load(trial).queued(trial.number))  # what it was queued with
            started = time.perf_counter()
            asked = [leader]
            try:
                if runner.pack != 1 or leader.record.pack_id is not None:
                    with contextlib.suppress(*USER_ERRORS):  # a setting that fails its checks fails alone, below
                        runner.start(leader.trial, leader.record)
                    asked += runner.followers(leader, budget, storage, study_id)
                in_pack, alone = _in_pack(leader, asked[1:])
                with heartbeat(storage, study_id, [run.trial for run in asked]):
                    for runs in [in_pack] + [[run] for run in alone]:
                        results = runner.run(runs, deadline)
                        seconds = time.perf_counter() - started
                        for run, result in zip(runs, results):
                            failures, leave = _finish(study, run, result, seconds, failures, done, trackers, log,
                                                      leave)
                        asked = [run for run in asked if run not in runs]
                        started = time.perf_counter()
            except BaseException:
                for run in asked:
                    with _unless_already_finished(log, run.trial):
                        _requeue(study, run.trial, run.record, "worker stopped during the trial; queued again")
                raise
        if stop.is_set():
            break
    return done


def _finish(study: optuna.Study, run: Running, result: Outcome | Exception, seconds: float, failures: int,
            done: dict[str, int], trackers: Tracker, log: Callable[[str], None], leave: bool) -> tuple[int, bool]:
    """Store how a trial ended, or queue it again when that was not its fault; (failures in a row, whether the
    worker leaves the study). A storage that became unusable is raised once the trial is queued again."""
    name, trial, record = study.study_name, run.trial, run.record
    if isinstance(result, Exception):
        reason = str(result) if isinstance(result, StopRequested) else f"not run: {result}"
        with _unless_already_finished(log, trial):
            _requeue(study, trial, record, reason)
        trackers.trial_finished(name, trial.number, "fail", None, reason)
        if isinstance(result, StorageUnavailable):
            raise result
        if isinstance(result, DataError) and not leave:
            study.set_user_attr(ENDED_ATTR, f"worker left: {result}")
            log(f"[{name}] this worker leaves the study: {result}")
        else:
            log(f"[{name} #{trial.number}] {reason}")
        return failures, True
    with _unless_already_finished(log, trial):
        _tell(study, trial, record, result, seconds)
    trackers.trial_finished(name, trial.number, result.state.name.lower(), result.value, result.reason)
    packed = f"pack #{record.pack_id} of {record.pack_size}; " if record.pack_id is not None else ""
    log(f"[{name} #{trial.number}] {result.state.name.lower()}"
        + (f" {result.value:.2%}" if result.value is not None else "")
        + f" ({result.reason}; {packed}{seconds:.1f}s)")
    if result.state != TrialState.FAIL:
        done[name] += 1
        return 0, leave
    failures += 1
    if failures >= MAX_CONSECUTIVE_FAILURES and not leave:
        study.set_user_attr(ENDED_ATTR, f"{failures} trials in a row failed (see their reasons)")
        log(f"[{name}] {failures} trials in a row failed; this worker leaves the study (see reasons)")
        return failures, True
    return failures, leave

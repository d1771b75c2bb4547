"""What a trial and a tested best store, each with one owner: a dataclass, its `save` and its `load`.

A worker writes a `TrialRecord` on its trial (when it starts, and when it ends); `best` writes a `BestResult` on
the study. Every reader (best, report, dashboard, warm starts, export, the progress display) goes through
`load`, so a field is named in this module only and a renamed one cannot break a reader silently.

Versions: records written by this release are version 2, one JSON user attribute per trial ("record").
Version 1 (releases up to 0.1.0) stored each field as its own user attribute; `load` reads both, so a study
written by an earlier release still loads.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field, fields
from typing import Any

from optuna.trial import FrozenTrial

from search.training import EpochMetrics

RECORD_VERSION = 2
_TRIAL_ATTR = "record"
_BEST_ATTR = "best_result"
# version 1: each TrialRecord field was a user attribute of its own, under the field's name
_V1_FIELDS = ("seed", "first_number", "params", "worker", "device", "threads", "trainable_parameters", "history",
              "best_epoch", "reason", "seconds", "resumed_after_epoch", "reference", "retry_of", "warm_start")


@dataclass
class TrialRecord:
    """What one trial ran with and what became of it.

    Set when the trial is queued (a re-run's seed and number, the hand-found setting, a warm start's source),
    when it starts (params, seed, where it runs) and when it ends (curves, best epoch, reason, seconds).
    """

    seed: int | None = None
    first_number: int | None = None  # the trial number a re-run continues (its checkpoint's name)
    params: dict[str, Any] | None = None  # every parameter that shaped the run, sampled and resolved
    worker: str | None = None  # host:pid
    device: str | None = None
    threads: int | None = None
    trainable_parameters: int | None = None
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int | None = None
    reason: str | None = None
    seconds: float | None = None
    resumed_after_epoch: int | None = None
    reference: bool = False  # the family's hand-found setting (--enqueue-reference)
    retry_of: int | None = None  # the interrupted trial this one runs again
    warm_start: str | None = None  # "URL#STUDY trial #N" it was copied from
    provenance: dict[str, Any] | None = None  # what ran it: versions, commit, device, command
    data_seed: int | None = None  # seed of its batch order and augmentation, when not `seed` (a pack's leader's)
    pack_id: int | None = None  # the trial pack it trained in: its leader's first trial number
    pack_size: int | None = None  # how many trials that pack started with

    @classmethod
    def load(cls, trial: FrozenTrial | Any) -> TrialRecord:
        """The record of a trial (an Optuna FrozenTrial or Trial), from either storage version."""
        attrs = trial.user_attrs
        stored = attrs.get(_TRIAL_ATTR)
        values = dict(stored) if isinstance(stored, dict) else {k: attrs[k] for k in _V1_FIELDS if k in attrs}
        values.pop("version", None)
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in values.items() if k in known})
        record.history = [m if isinstance(m, EpochMetrics) else EpochMetrics(**m) for m in record.history or []]
        return record

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values, as stored and as the report's JSON writes it."""
        return {"version": RECORD_VERSION, **_plain(self)}

    def save(self, trial: Any) -> None:
        """Store the whole record on a running trial: one storage write."""
        trial.set_user_attr(_TRIAL_ATTR, self.to_json())

    def user_attrs(self) -> dict[str, Any]:
        """The user attributes that hold this record: to queue a trial with (`study.enqueue_trial(...,
        user_attrs=...)`) or to build one (`optuna.trial.create_trial`)."""
        return {_TRIAL_ATTR: self.to_json()}

    def queued(self, number: int) -> TrialRecord:
        """A fresh record for trial `number` that keeps what it was queued with: a re-run's seed and the number
        it continues, the hand-found setting, a warm start's source, its pack and data seed (a failed attempt's
        curves are dropped)."""
        return TrialRecord(seed=self.seed, first_number=self.first_number if self.first_number is not None else number,
                           reference=self.reference, retry_of=self.retry_of, warm_start=self.warm_start,
                           data_seed=self.data_seed, pack_id=self.pack_id, pack_size=self.pack_size)

    @classmethod
    def scalar_fields(cls) -> list[str]:
        """The fields that hold one number, name or flag each: a table's columns."""
        nested = {"params", "history", "provenance"}
        return [f.name for f in fields(cls) if f.name not in nested]

    def setting_json(self, trial: FrozenTrial) -> dict[str, Any]:
        """What repeats the trial by hand (`stl10-search train --param ...`): its full params, seed, best epoch."""
        return {"params": self.params_of(trial), "seed": self.seed, "best_epoch": self.best_epoch}

    def params_of(self, trial: FrozenTrial) -> dict[str, Any]:
        """Every parameter that shaped the run; a trial that never started has only its sampled ones."""
        return dict(self.params or trial.params)

    @property
    def best(self) -> EpochMetrics | None:
        """The epoch with the best validation accuracy (the earliest on a tie)."""
        return max(self.history, key=lambda m: (m.val_accuracy, -m.epoch)) if self.history else None

    @property
    def clock_stopped(self) -> bool:
        """Stopped by the time budget: it ran fewer epochs than its budget and was not pruned or failed."""
        return bool(self.history and self.params and len(self.history) < int(self.params["epochs"])
                    and self.reason and self.reason.startswith("time budget"))


def _plain(value: Any) -> Any:
    """`dataclasses.asdict` for records of JSON values: dataclasses as dicts and containers copied as it does, but
    numbers and strings shared, not deep-copied. A report of 10,000 trials spent 9 s in asdict."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    names = _field_names(type(value))
    if names is None:
        return copy.deepcopy(value)
    return {name: _plain(getattr(value, name)) for name in names}


@functools.cache
def _field_names(kind: type) -> tuple[str, ...] | None:
    return tuple(f.name for f in fields(kind)) if dataclasses.is_dataclass(kind) else None


def retried_number(trial: FrozenTrial) -> int | None:
    """The number of the interrupted trial that `trial` runs again (its record's `retry_of`), read without
    loading the whole record: counting trials reads it for every trial of a study."""
    stored = trial.user_attrs.get(_TRIAL_ATTR)
    return stored.get("retry_of") if isinstance(stored, dict) else trial.user_attrs.get("retry_of")


def trial_params(trial: FrozenTrial) -> dict[str, Any]:
    """Every parameter that shaped the trial's run: the sampled ones and the fixed ones resolved with them."""
    return TrialRecord.load(trial).params_of(trial)


@dataclass
class BestResult:
    """A study's best trial retrained and scored once on the test split, stored on the study by `best`."""

    trial: int
    val_accuracy: float | None
    retrained_val_accuracy: float | None  # equals a solo trial's val_accuracy on the CPU unless full_train
    test_loss: float
    test_accuracy: float
    test_images: int
    per_class_accuracy: list[float | None]
    confusion_matrix: list[list[int]]  # rows true classes, columns predicted
    classes: list[str]
    trainable_parameters: int
    params: dict[str, Any]
    epochs: int  # the best epoch it was retrained to
    seed: int
    seconds: float
    full_train: bool
    device: str
    latency_ms: dict[str, float] = field(default_factory=dict)  # per image, median, by "batch_1", "batch_256"
    latency_iqr_ms: dict[str, float] = field(default_factory=dict)
    latency_threads: int | None = None
    artifact_id: str | None = None  # the weights, an Optuna artifact of the study
    artifact_file: str | None = None
    provenance: dict[str, Any] | None = None
    bundle: str | None = None  # where `export` last wrote its bundle
    data_seed: int | None = None  # seed of the batch order, when not `seed`: a pack member's (its pack's leader's)

    @classmethod
    def load(cls, study: Any) -> BestResult | None:
        """The stored result of a study, None when `best` has not run; a result of version 1 loads too."""
        stored = study.user_attrs.get(_BEST_ATTR)
        if not isinstance(stored, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **dataclasses.asdict(self)}

    def save(self, study: Any) -> None:
        study.set_user_attr(_BEST_ATTR, self.to_json())

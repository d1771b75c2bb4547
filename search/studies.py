"""A study per model family: its settings live on the study itself, so every worker on any host agrees.

Stored as study user attributes: the budget, the sampler and pruner, the seed, the space overrides, the
data configuration and, for a family from a file, that file. Workers read them back; only host-specific
paths may be overridden per worker. The rules every command shares live here too: a trial's seed, which
trial is the best, and how trials are counted.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError
from search.family import Family, get_family, load_family_file
from search.pipeline import STORED_DATA_FIELDS, DataConfig
from search.optuna_private import study_id
from search.provenance import provenance
from search.records import TrialRecord, retried_number
from search.sampling import PRUNERS, SAMPLERS, make_pruner, make_sampler
from search.space import Dim, customize

if TYPE_CHECKING:
    from optuna.study._frozen import FrozenStudy

SETTINGS_ATTR = "settings"
DEADLINE_ATTR = "deadline"  # UTC seconds since the epoch after which no trial starts and running ones stop
ENDED_ATTR = "ended"  # why the last search of the study ended: its trial budget or its time budget
DATA_ATTR = "data_identity"  # classes and images per class of the train part the study searched
PROVENANCE_ATTR = "provenance"  # what ran the search that last created or continued it (search.provenance)
OBJECTIVE_NAME = "validation accuracy"


@dataclass
class StudySettings:
    family: str
    n_trials: int | None  # finished trials; None: no count, the time budget ends the search
    sampler: str = SAMPLERS.default
    pruner: str = PRUNERS.default
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # the user's fixes and narrowed ranges
    data: dict[str, Any] = field(default_factory=dict)  # STORED_DATA_FIELDS of the DataConfig
    family_file: str | None = None  # where a family not built in is defined; loaded by every worker
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # tells a study from an older one of the same name

    def model_family(self) -> Family:
        if self.family_file:
            load_family_file(self.family_file)
        return get_family(self.family)

    def dims(self) -> list[Dim]:
        """The family's space with the stored overrides; a fixed --image-size fixes a searched image size."""
        family = self.model_family()
        dims = family.dims(self.space)
        size = self.data.get("image_size")
        if size and any(d.name == "image_size" for d in dims) and "image_size" not in self.space:
            dims = customize(family.name, dims, {"image_size": size})
        return dims

    def max_epochs(self) -> int:
        epochs = next(d for d in self.dims() if d.name == "epochs")
        return int(max(epochs.choices) if epochs.choices else epochs.high)

    def data_config(self, cache_dir: Path | None = None, data_root: Path | None = None,
                    weights: str | None = None) -> DataConfig:
        """The stored data configuration, with this host's cache folder, data folder or weights path if given."""
        values = {k: v for k, v in self.data.items() if k in STORED_DATA_FIELDS}
        values["data_root"] = data_root or (Path(values["data_root"]) if values.get("data_root") else None)
        if weights is not None:
            values["weights"] = weights
        return DataConfig(**values, **({"cache_dir": cache_dir} if cache_dir else {}))


def data_fields(config: DataConfig) -> dict[str, Any]:
    values = {name: getattr(config, name) for name in STORED_DATA_FIELDS}
    if values["data_root"] is not None:
        values["data_root"] = str(Path(values["data_root"]).resolve())
    return values


def study_name(family: str, prefix: str = "") -> str:
    return f"{prefix}{family}"


def save_settings(study: optuna.Study, settings: StudySettings) -> None:
    study.set_user_attr(SETTINGS_ATTR, json.loads(json.dumps(asdict(settings))))


def load_settings(study: optuna.Study) -> StudySettings:
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        raise UserError(f"study {study.study_name!r} was not created by stl10-search (no settings stored)")
    known = {f.name for f in fields(StudySettings)}
    values = {k: v for k, v in stored.items() if k in known}
    values.setdefault("uid", f"{study.study_name}-{study_id(study)}")  # a study made before uids were stored
    return StudySettings(**values)


def stored_studies(storage: optuna.storages.BaseStorage) -> list[FrozenStudy]:
    """Every study in `storage`, with its name and user attributes, without reading a trial.

    Not `optuna.get_all_study_summaries`: it deep-copies every trial of every study to count them (11 s for a
    study of 5,000 trials), and every command starts by listing the studies.
    """
    return storage.get_all_studies()


def existing_study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in stored_studies(storage)]


def load_stored_families(storage: optuna.storages.BaseStorage) -> None:
    """Register the families that the studies in `storage` name by file, so `best` and `report` know them too."""
    for study in stored_studies(storage):
        path = (study.user_attrs.get(SETTINGS_ATTR) or {}).get("family_file")
        if path and Path(path).is_file():
            load_family_file(path)


def create_or_update(storage: optuna.storages.BaseStorage, name: str, settings: StudySettings,
                     enqueue_reference: bool = False) -> optuna.Study:
    """Create the study, or continue it: a new budget or space is taken, other data is an error."""
    if name in existing_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        old = load_settings(study)
        if old.family != settings.family:
            raise UserError(f"study {name!r} holds model {old.family}, not {settings.family}")
        if old.data != settings.data:
            differences = ", ".join(f"{k}: {old.data.get(k)!r} -> {settings.data.get(k)!r}"
                                    for k in STORED_DATA_FIELDS if old.data.get(k) != settings.data.get(k))
            raise UserError(f"study {name!r} was created with other data settings ({differences}); "
                            "pass the same data options, or use --study-prefix for a new set of studies")
        settings.uid = old.uid
    else:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    if study.metric_names != [OBJECTIVE_NAME]:
        study.set_metric_names([OBJECTIVE_NAME])  # optuna-dashboard shows it instead of "Objective 0"
    save_settings(study, settings)
    study.set_user_attr(PROVENANCE_ATTR, provenance().as_dict())
    if enqueue_reference:
        family = settings.model_family()
        study.enqueue_trial(family.reference_trial(settings.dims()),
                            user_attrs=TrialRecord(reference=True).user_attrs(), skip_if_exists=True)
    return study


def set_deadlines(studies: list[optuna.Study], seconds: float | None, weights: list[float], now: float) -> None:
    """Give a search of `studies` (worked through in this order) `seconds` of wall time in all.

    Study i ends at now + seconds x (share of the weights up to i): a study that meets its trial budget early
    leaves its time to the next ones. `seconds` None clears the deadlines (a search without time budget).
    """
    total = sum(weights)
    elapsed = 0.0
    for study, weight in zip(studies, weights):
        elapsed += weight
        study.set_user_attr(DEADLINE_ATTR, None if seconds is None else now + seconds * elapsed / total)


def deadline_of(storage: optuna.storages.BaseStorage, study_id: int) -> float | None:
    """The study's deadline as stored now (read from storage: a new search may have moved it)."""
    return storage.get_study_user_attrs(study_id).get(DEADLINE_ATTR)


def trial_seed(settings: StudySettings, record: TrialRecord, number: int) -> int:
    """A trial's seed: the one its record holds (queued with, for a re-run, or run with), else the study seed plus
    its number."""
    return int(record.seed) if record.seed is not None else settings.seed + number


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The completed trial with the highest validation accuracy, the earliest on a tie; None when none completed."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def worker_seed(base_seed: int) -> int:
    """Different for every worker process, so parallel samplers do not propose the same points."""
    return (base_seed * 1_000_003 + zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())) % 2**31


def load_for_work(storage: optuna.storages.BaseStorage, name: str, seed_offset: int | None = None
                  ) -> tuple[optuna.Study, StudySettings]:
    """The study with this worker's sampler and the study's pruner attached."""
    if name not in existing_study_names(storage):
        raise UserError(f"no study {name!r} in this storage; create it with `stl10-search search --workers 0`")
    settings = load_settings(optuna.load_study(study_name=name, storage=storage))
    seed = worker_seed(settings.seed) if seed_offset is None else settings.seed + seed_offset
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(settings.sampler, seed, settings.n_trials),
        pruner=make_pruner(settings.pruner, settings.max_epochs()),
    )
    return study, settings


@dataclass(frozen=True)
class Counts:
    """Trials by what happened to them. A failed trial that was queued again (Ctrl-C, a worker that died) is
    "interrupted", not "failed": failed means the setting itself could not run."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        """What the budget counts: trials that ran to their end or were pruned."""
        return self.complete + self.pruned

    @property
    def committed(self) -> int:
        """Finished, plus trials running now. Queued (WAITING) trials are not counted: `ask` pops them first,
        so a re-queued or enqueued trial in the last free slot is run rather than waited for."""
        return self.finished + self.running


def requeued_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that another trial re-runs: by a stop request (its record's `retry_of`) or a
    heartbeat failure ("failed_trial", set by Optuna's retry callback)."""
    numbers = {retried_number(t) for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    numbers.discard(None)
    return numbers  # type: ignore[return-value]


def state_name(trial: FrozenTrial, requeued: set[int]) -> str:
    """"complete", "pruned", "failed", "interrupted" (failed, then queued again), "running" or "waiting"."""
    if trial.state == TrialState.FAIL and trial.number in requeued:
        return "interrupted"
    return "failed" if trial.state == TrialState.FAIL else trial.state.name.lower()


def count_trials(storage: optuna.storages.BaseStorage, study_id: int) -> Counts:
    """Trials per state, read from the storage itself (not a worker's cache) in one query."""
    return counts_of(storage.get_all_trials(study_id, deepcopy=False))


def counts_of(trials: list[FrozenTrial]) -> Counts:
    requeued = requeued_numbers(trials)
    states = [t.state for t in trials]
    interrupted = sum(t.state == TrialState.FAIL and t.number in requeued for t in trials)
    return Counts(complete=states.count(TrialState.COMPLETE), pruned=states.count(TrialState.PRUNED),
                  failed=states.count(TrialState.FAIL) - interrupted, interrupted=interrupted,
                  running=states.count(TrialState.RUNNING), waiting=states.count(TrialState.WAITING))


def search_seconds(trials: list[FrozenTrial]) -> float:
    """Wall time of the search: first trial started to last trial finished."""
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0

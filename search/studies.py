"""A study per model family: its settings live on the study itself, so every worker on any host agrees.

Stored as study user attributes: the budget, the sampler and pruner, the seed, the space overrides and
the data configuration. Workers read them back; only host-specific paths may be overridden per worker.
"""

from __future__ import annotations

import json
import socket
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError
from search.pipeline import DataConfig
from search.spaces import Dim, build_space, reference_trial
from search.storage import with_retries

SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("hyperband", "halving", "median", "none")
SETTINGS_ATTR = "settings"
DATA_FIELDS = ("dataset", "data_root", "val_fraction", "split_seed", "image_size", "weights")


@dataclass
class StudySettings:
    family: str
    n_trials: int
    sampler: str = "tpe"
    pruner: str = "hyperband"
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # the user's fixes and narrowed ranges
    data: dict[str, Any] = field(default_factory=dict)  # DATA_FIELDS of the DataConfig

    def dims(self) -> list[Dim]:
        return build_space(self.family, self.space)

    def max_epochs(self) -> int:
        epochs = next(d for d in self.dims() if d.name == "epochs")
        return int(max(epochs.choices) if epochs.choices else epochs.high)

    def data_config(self, cache_dir: Path | None = None, data_root: Path | None = None,
                    weights: str | None = None) -> DataConfig:
        """The stored data configuration, with this host's cache folder, data folder or weights path if given."""
        values = dict(self.data)
        values["data_root"] = data_root or (Path(values["data_root"]) if values.get("data_root") else None)
        if weights is not None:
            values["weights"] = weights
        return DataConfig(**values, **({"cache_dir": cache_dir} if cache_dir else {}))


def data_fields(config: DataConfig) -> dict[str, Any]:
    values = {name: getattr(config, name) for name in DATA_FIELDS}
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
    return StudySettings(**stored)


def existing_study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in with_retries(lambda: optuna.get_all_study_summaries(storage, include_best_trial=False))]


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
                                    for k in DATA_FIELDS if old.data.get(k) != settings.data.get(k))
            raise UserError(f"study {name!r} was created with other data settings ({differences}); "
                            "pass the same data options, or use --study-prefix for a new set of studies")
    else:
        study = with_retries(lambda: optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                                         load_if_exists=True))
    save_settings(study, settings)
    if enqueue_reference:
        study.enqueue_trial(reference_trial(settings.family, settings.dims()), user_attrs={"reference": True},
                            skip_if_exists=True)
    return study


def worker_seed(base_seed: int) -> int:
    """Different for every worker process, so parallel samplers do not propose the same points."""
    import os

    return (base_seed * 1_000_003 + zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())) % 2**31


def make_sampler(kind: str, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    if kind == "tpe":
        startup = max(4, min(10, n_trials // 4))
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise UserError(f"unknown sampler {kind!r}; choose from {', '.join(SAMPLERS)}")


def make_pruner(kind: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Pruning reads per-epoch validation accuracy; Hyperband spreads the epoch budget over brackets."""
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"unknown pruner {kind!r}; choose from {', '.join(PRUNERS)}")


def load_for_work(storage: optuna.storages.BaseStorage, name: str, seed_offset: int | None = None
                  ) -> tuple[optuna.Study, StudySettings]:
    """The study with this worker's sampler and the study's pruner attached."""
    if name not in existing_study_names(storage):
        raise UserError(f"no study {name!r} in this storage; create it with `stl10-search search` or `create`")
    plain = optuna.load_study(study_name=name, storage=storage)
    settings = load_settings(plain)
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
    complete: int = 0
    pruned: int = 0
    failed: int = 0
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


def count_trials(storage: optuna.storages.BaseStorage, study: optuna.Study) -> Counts:
    """Trials per state, read from the storage itself (not a worker's cache) in one query."""
    study_id = with_retries(lambda: storage.get_study_id_from_name(study.study_name))
    return counts_of(with_retries(lambda: storage.get_all_trials(study_id, deepcopy=False)))


def counts_of(trials: list[FrozenTrial]) -> Counts:
    states = [t.state for t in trials]
    return Counts(*(states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                              TrialState.RUNNING, TrialState.WAITING)))


def search_seconds(trials: list[FrozenTrial]) -> float:
    """Wall time of the search: first trial started to last trial finished."""
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0

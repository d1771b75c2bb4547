"""What a report shows, read once from storage: per study its settings, trials, best trial and test result."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError
from search.family import families, get_family
from search.records import BestResult, TrialRecord
from search.studies import (SETTINGS_ATTR, Counts, StudySettings, best_trial, counts_of, existing_study_names,
                            load_settings, load_stored_families, requeued_numbers, search_seconds)
from search.training import EpochMetrics

MIN_TRIALS_FOR_IMPORTANCE = 3


@dataclass
class StudyReport:
    """One study as the report sees it."""

    study: optuna.Study
    settings: StudySettings
    trials: list[FrozenTrial]
    counts: Counts
    best: FrozenTrial | None
    result: BestResult | None  # the stored `best` result, when it is for the current best trial
    stale_result: bool  # a result exists, but for a trial that is no longer the best
    search_seconds: float
    importances: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    records: dict[int, TrialRecord] = field(default_factory=dict)  # by trial number, each read once

    def __post_init__(self) -> None:
        self.records = {t.number: TrialRecord.load(t) for t in self.trials}

    def record(self, trial: FrozenTrial) -> TrialRecord:
        return self.records[trial.number]

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def requeued(self) -> set[int]:
        """Numbers of the trials that were interrupted and queued again."""
        return requeued_numbers(self.trials)

    @property
    def title(self) -> str:
        return get_family(self.settings.family).title

    @property
    def reference(self) -> dict[str, Any] | None:
        """The hand-tuned study's figures, shown beside the search's when the data is STL-10 as theirs was."""
        return get_family(self.settings.family).study_results if self.settings.data.get("dataset") == "stl10" else None

    @property
    def reference_trial(self) -> FrozenTrial | None:
        """The trial that ran the family's hand-found setting (queued by `--enqueue-reference`), if any."""
        return next((t for t in self.trials if self.record(t).reference), None)

    @property
    def history(self) -> list[EpochMetrics]:
        return list(self.record(self.best).history) if self.best else []

    @property
    def parameters(self) -> int | None:
        if self.result:
            return self.result.trainable_parameters
        return self.record(self.best).trainable_parameters if self.best else None


def find_studies(storage: optuna.storages.BaseStorage, prefix: str = "") -> list[optuna.Study]:
    """The studies of this tool (settings stored, named prefix + model), in the models' order."""
    load_stored_families(storage)
    order = list(families())
    found = []
    for name in existing_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        settings = study.user_attrs.get(SETTINGS_ATTR)
        if settings and name == prefix + settings.get("family", "") and settings["family"] in order:
            found.append(study)
    return sorted(found, key=lambda s: order.index(load_settings(s).family))


def param_importances(study: optuna.Study, complete: list[FrozenTrial]) -> tuple[dict[str, float] | None, str | None]:
    """Optuna's default (PED-ANOVA) importances, or None and why not: too few trials or nothing varied."""
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, f"parameter importances need {MIN_TRIALS_FOR_IMPORTANCE} completed trials, have {len(complete)}"
    try:
        with warnings.catch_warnings():  # "some regimes have less than 2 trials": expected in small studies
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError, ImportError) as error:
        return None, f"parameter importances unavailable: {error}"
    importances = {k: float(v) for k, v in importances.items() if not math.isnan(v)}
    if not importances:
        return None, "parameter importances unavailable: no parameter varied across the completed trials"
    return importances, None


def collect(storage: optuna.storages.BaseStorage, prefix: str = "", *, importances: bool = True) -> list[StudyReport]:
    """Every study of this tool in `storage`; a UserError when there is none.

    `importances=False` skips the parameter importances, the one slow part, for callers that draw no study plots.
    """
    studies = find_studies(storage, prefix)
    if not studies:
        raise UserError("no stl10-search studies in this storage" + (f" with prefix {prefix!r}" if prefix else "")
                        + "; run `stl10-search search` (or `run`) first")
    reports = []
    for study in studies:
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = best_trial(trials)
        stored = BestResult.load(study)
        current = stored if stored and best and stored.trial == best.number else None
        report = StudyReport(study, load_settings(study), trials, counts_of(trials), best, current,
                             stale_result=bool(stored) and current is None, search_seconds=search_seconds(trials))
        if best is None:
            report.notes.append("no completed trial yet: see the trial table for the reasons")
        if report.stale_result:
            report.notes.append(f"the stored test result is for trial #{stored.trial}, no longer the best; "
                                "run `stl10-search best` again")
        elif best is not None and current is None:
            report.notes.append("not tested yet: run `stl10-search best` to retrain the best trial and score it on test")
        if importances:
            report.importances, why_not = param_importances(study, complete)
            if why_not:
                report.notes.append(why_not)
        reports.append(report)
    return reports


def trial_seconds(trial: FrozenTrial, record: TrialRecord) -> float | None:
    """The wall seconds the worker measured, else the span between the trial's start and end in storage."""
    if record.seconds is not None:
        return float(record.seconds)
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trial_reason(trial: FrozenTrial, record: TrialRecord) -> str | None:
    """Why the trial ended. A trial failed by the heartbeat has no stored reason: its worker died mid-trial."""
    if record.reason is None and trial.state == TrialState.FAIL:
        return "worker stopped sending heartbeats (died or was killed); the trial was queued again"
    return record.reason

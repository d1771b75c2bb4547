"""What a report shows, read once from storage: per study its settings, trials, best trial and test result.

A study of thousands of trials is reported whole in report.json and trials.csv; its plots and its trial table in
report.md and report.html show a bounded choice of them (`Plotted`, `StudyReport.table_trials`), and say so in the
study's notes.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.importance import BaseImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError
from search.family import families, get_family
from search.optuna_private import study_id
from search.rdb_reads import latest_and_best
from search.records import BestResult, TrialRecord
from search.storage import RetryingStorage
from search.studies import (SETTINGS_ATTR, Counts, StudySettings, best_trial, counts_of, existing_study_names,
                            load_settings, load_stored_families, requeued_numbers, search_seconds)
from search.training import EpochMetrics

MIN_TRIALS_FOR_IMPORTANCE = 3
PLOTTED_TRIALS = 1_000  # most completed trials a study's Optuna plots draw: a parallel-coordinates line each
TABLE_TRIALS = 500  # most rows of a study's trial table in report.md and report.html
TABLE_BEST = 50  # of which the best completed trials, always listed


class _Stored(BaseImportanceEvaluator):
    """Importances already computed, for Optuna's importance plot to draw as they are."""

    def __init__(self, importances: dict[str, float]) -> None:
        self.importances = importances

    def evaluate(self, study: optuna.Study, params: list[str] | None = None, *, target: Any = None
                 ) -> dict[str, float]:
        return dict(self.importances)


@dataclass
class Plotted:
    """The completed trials a study's Optuna plots draw (`plotted_trials`), in a study of their own in memory.

    Only their params and values are copied, as Optuna's plots deep-copy every trial they read. That study numbers
    them from 0, so `renumbered` puts a figure's trial numbers back. The importance plot draws `importances` (the
    report's, computed on every completed trial) and reads nothing else of its study than each parameter's
    distribution, deep-copying every trial once per parameter: it gets `params_study`, one trial per parameter.
    """

    study: optuna.Study
    numbers: list[int]  # each plotted trial's number in the stored study, in the order of `study`'s trials
    importances: BaseImportanceEvaluator
    params_study: optuna.Study

    def renumbered(self, figure: go.Figure) -> go.Figure:
        """`figure` (whose x axis is the trial number, as the optimization history's) with the stored numbers."""
        for trace in figure.data:
            if trace.x is not None:
                trace.x = [self.numbers[int(x)] for x in trace.x]
        return figure


def _in_memory(name: str, trials: Any) -> optuna.Study:
    """A study in memory holding the params and value of each of `trials` (completed ones)."""
    study = optuna.create_study(study_name=name, direction="maximize")
    study.add_trials([optuna.trial.create_trial(value=t.value, params=t.params, distributions=t.distributions)
                      for t in trials])
    return study


def plotted_trials(complete: list[FrozenTrial], limit: int) -> list[FrozenTrial]:
    """The completed trials a study's plots draw, in number order: all of them up to `limit`; past it, every trial
    that raised the best value (so the history's best-value line is the study's own), the best tenth of `limit`,
    one trial for each parameter the others lack (the importance plot names every parameter), and trials evenly
    spaced over the search for the rest."""
    if len(complete) <= limit:
        return sorted(complete, key=lambda t: t.number)
    ordered = sorted(complete, key=lambda t: t.number)
    chosen: dict[int, FrozenTrial] = {}
    best = -math.inf
    for trial in ordered:
        if trial.value > best:
            best = trial.value
            chosen[trial.number] = trial
    chosen = dict(list(chosen.items())[-(limit // 2):])  # a search that kept improving: its latest records
    by_value = sorted(ordered, key=lambda t: (-t.value, t.number))
    chosen.update((t.number, t) for t in by_value[:limit // 10])
    named = {name for t in chosen.values() for name in t.params}
    for trial in by_value:
        if not named.issuperset(trial.params):
            chosen[trial.number] = trial
            named.update(trial.params)
    rest = [t for t in ordered if t.number not in chosen]
    room = max(limit - len(chosen), 0)
    chosen.update((t.number, t) for t in (rest[i * len(rest) // room] for i in range(room)) if room)
    return sorted(chosen.values(), key=lambda t: t.number)


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
    requeued: set[int] = field(default_factory=set)  # numbers of the trials interrupted and queued again

    def __post_init__(self) -> None:
        self.records = {t.number: TrialRecord.load(t) for t in self.trials}
        self.requeued = requeued_numbers(self.trials)  # once: every trial's row asks (it was 0.2 s a row at 5,000)

    def record(self, trial: FrozenTrial) -> TrialRecord:
        return self.records[trial.number]

    @property
    def name(self) -> str:
        return self.study.study_name

    @functools.cached_property
    def plotted(self) -> Plotted:
        """The completed trials the study's Optuna plots draw, at most PLOTTED_TRIALS (see `plotted_trials`)."""
        trials = plotted_trials([t for t in self.trials if t.state == TrialState.COMPLETE], PLOTTED_TRIALS)
        first_with: dict[str, FrozenTrial] = {}  # per parameter, the first plotted trial that has it
        for trial in trials:
            for name in trial.params:
                first_with.setdefault(name, trial)
        one_per_param = {t.number: t for t in first_with.values()}.values()
        return Plotted(_in_memory(self.name, trials), [t.number for t in trials], _Stored(self.importances or {}),
                       _in_memory(self.name, one_per_param))

    @functools.cached_property
    def table_trials(self) -> list[FrozenTrial]:
        """The trials the trial table of report.md and report.html lists, in number order: all of them up to
        TABLE_TRIALS; past it the TABLE_BEST best completed ones, the hand-found setting's, and the most recent."""
        if len(self.trials) <= TABLE_TRIALS:
            return list(self.trials)
        complete = [t for t in self.trials if t.state == TrialState.COMPLETE]
        chosen = {t.number: t for t in sorted(complete, key=lambda t: (-t.value, t.number))[:TABLE_BEST]}
        if self.reference_trial is not None:
            chosen[self.reference_trial.number] = self.reference_trial
        for trial in sorted(self.trials, key=lambda t: -t.number):
            if len(chosen) >= TABLE_TRIALS:
                break
            chosen.setdefault(trial.number, trial)
        return sorted(chosen.values(), key=lambda t: t.number)

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


def collect(storage: optuna.storages.BaseStorage, prefix: str = "", *, importances: bool = True,
            latest: int | None = None) -> list[StudyReport]:
    """Every study of this tool in `storage`; a UserError when there is none.

    `importances=False` skips the parameter importances, the one slow part, for callers that draw no study plots.
    `latest` reads only each study's `latest` most recent trials and its best tenth of that many, for a figure
    whose cost must not grow with the studies (`best`'s refresh of the dashboard's cross-model figure): the
    reports then hold those trials alone, so their counts and tables describe those.
    """
    studies = find_studies(storage, prefix)
    if not studies:
        raise UserError("no stl10-search studies in this storage" + (f" with prefix {prefix!r}" if prefix else "")
                        + "; run `stl10-search search` (or `run`) first")
    reports = []
    for study in studies:
        trials = study.get_trials(deepcopy=False) if latest is None else _latest_and_best(storage, study, latest)
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
        report.notes += bounded_notes(report, len(complete))
        reports.append(report)
    return reports


def _latest_and_best(storage: optuna.storages.BaseStorage, study: optuna.Study, latest: int) -> list[FrozenTrial]:
    if isinstance(storage, RetryingStorage):
        return storage.latest_and_best_trials(study_id(study), latest, latest // 10)
    return latest_and_best(study.get_trials(deepcopy=False), latest, latest // 10)


def bounded_notes(report: StudyReport, complete: int) -> list[str]:
    """What the plots and the trial table of a large study leave out."""
    notes = []
    if complete > PLOTTED_TRIALS:
        notes.append(f"the optimization history, parallel coordinates and importance plots draw {PLOTTED_TRIALS:,} "
                     f"of the {complete:,} completed trials: every one that raised the best value, the "
                     f"{PLOTTED_TRIALS // 10:,} best, and others evenly spaced over the search; the importances are "
                     "computed on every completed trial")
    if len(report.trials) > TABLE_TRIALS:
        notes.append(f"the trial table lists {TABLE_TRIALS:,} of the {len(report.trials):,} trials: the "
                     f"{TABLE_BEST} best and the most recent; trials.csv and report.json hold every trial")
    return notes


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

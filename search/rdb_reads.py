"""Optuna's RDB storage, reading trials with SQLAlchemy Core instead of its ORM: the same trials, 10x faster.

Every command reads whole studies: a worker when it starts (and its sampler and pruner the new trials each time),
`report`, `best`, the dashboard. Optuna's `RDBStorage` builds an ORM object per row and parses every parameter's
distribution JSON again: 11 s for a study of 10,000 trials of this project's shape (14 params, a 20-epoch
record, 20 intermediate values), where these queries and a cache of parsed distributions take 1.3 s.

`FastReadRDBStorage` overrides the two reads that build trials, `_get_trials` (behind `get_all_trials`, through
Optuna's cache) and `get_trial`, and the query behind `get_best_trial`, whose ties it breaks by the earliest trial
as the project's rule says (Optuna's leaves them to the database). Every write, and every other read, is Optuna's
own. The trials it returns are equal to Optuna's (tests/test_optuna_private.py compares them field by field); it
reads Optuna's tables, whose schema is private, through the table objects of Optuna's own models. It also reads
parts of a study without the rest (`latest_and_best_trials`), for the figures of a command whose cost must not grow
with the study.

The trials row of a study is read first, then its params, values and attributes: a trial found finished was
written whole before its state changed (Optuna sets state and values last, in one transaction), and rows of a
trial created in between are dropped, to be read the next time.
"""

from __future__ import annotations

import contextlib
import functools
import json
from datetime import datetime, timezone
from typing import Any, Container, Iterator

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.optuna_private import rdb_models

MAX_LISTED_IDS = 500  # trial ids listed in an IN clause; past it, a range is read and filtered here


@functools.lru_cache(maxsize=4096)
def _distribution(text: str) -> BaseDistribution:
    """Parsed once per distinct JSON: a study has a few dozen, and parsing each row's took a quarter of the time."""
    return json_to_distribution(text)


def _local(moment: datetime | None) -> datetime | None:
    """Optuna's RDB stores naive UTC; a FrozenTrial holds naive local time."""
    return None if moment is None else moment.replace(tzinfo=timezone.utc).astimezone().replace(tzinfo=None)


def _best_ids(study_id: int, direction: StudyDirection) -> sqlalchemy.Select:
    """The ids of the study's completed trials, best first by their first value (infinities as Optuna ranks them),
    the earliest trial first on a tie."""
    models = rdb_models()
    trials, values = models.TrialModel.__table__, models.TrialValueModel.__table__
    kinds = models.TrialValueModel.TrialValueType
    rank = sqlalchemy.case((values.c.value_type == kinds.INF_NEG, -1), (values.c.value_type == kinds.FINITE, 0),
                           (values.c.value_type == kinds.INF_POS, 1))
    better = sqlalchemy.desc if direction == StudyDirection.MAXIMIZE else sqlalchemy.asc
    return (sqlalchemy.select(trials.c.trial_id).join(values, values.c.trial_id == trials.c.trial_id)
            .where(trials.c.study_id == study_id, trials.c.state == TrialState.COMPLETE, values.c.objective == 0)
            .order_by(better(rank), better(values.c.value), trials.c.number))


def latest_and_best(trials: list[FrozenTrial], latest: int, best: int) -> list[FrozenTrial]:
    """`FastReadRDBStorage.latest_and_best_trials` on a list of a study's trials (of a storage it does not read),
    for a study that maximizes: the `latest` trials of highest number and the `best` completed ones of highest
    value, the earliest on a tie, in number order."""
    newest = sorted(trials, key=lambda t: -t.number)[:latest]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    top = sorted(complete, key=lambda t: (-t.value, t.number))[:best]
    return sorted({t.number: t for t in newest + top}.values(), key=lambda t: t.number)


class FastReadRDBStorage(RDBStorage):
    """RDBStorage whose trial reads are SQLAlchemy Core queries (see the module's docstring)."""

    def _get_trials(self, study_id: int, states: Container[TrialState] | None, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        models = rdb_models()
        trials = models.TrialModel.__table__
        included = {i for i in included_trial_ids if i <= trial_id_greater_than}
        where = trials.c.study_id == study_id
        if states is not None:
            where &= trials.c.state.in_(list(states))  # type: ignore[arg-type]
        if included and trial_id_greater_than > -1:
            if len(included) > MAX_LISTED_IDS:
                where &= trials.c.trial_id >= min(included)  # a superset, narrowed below
            else:
                where &= sqlalchemy.or_(trials.c.trial_id.in_(included), trials.c.trial_id > trial_id_greater_than)
        elif trial_id_greater_than > -1:
            where &= trials.c.trial_id > trial_id_greater_than
        with self._reading() as connection:
            studies = models.StudyModel.__table__
            if connection.execute(sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id)
                                  ).first() is None:
                raise KeyError(models.NOT_FOUND_MSG)
            found = self._read(connection, where)
        if len(included) > MAX_LISTED_IDS:
            found = [t for t in found if t._trial_id in included or t._trial_id > trial_id_greater_than]
        return found

    def _get_best_trial_id(self, study_id: int, direction: StudyDirection) -> int:
        with self._reading() as connection:
            found = connection.execute(_best_ids(study_id, direction).limit(1)).first()
        if found is None:
            raise ValueError(rdb_models().NOT_FOUND_MSG)
        return found[0]

    def latest_and_best_trials(self, study_id: int, latest: int, best: int) -> list[FrozenTrial]:
        """The study's `latest` trials of highest number and its `best` completed trials of highest value (see
        `_best_ids`), in trial id order, read without the rest of the study."""
        trials = rdb_models().TrialModel.__table__
        newest = (sqlalchemy.select(trials.c.trial_id).where(trials.c.study_id == study_id)
                  .order_by(trials.c.number.desc()).limit(latest))
        top = _best_ids(study_id, StudyDirection.MAXIMIZE).limit(best)
        with self._reading() as connection:
            return self._read(connection, sqlalchemy.or_(trials.c.trial_id.in_(newest), trials.c.trial_id.in_(top)))

    def get_trial(self, trial_id: int) -> FrozenTrial:
        models = rdb_models()
        with self._reading() as connection:
            found = self._read(connection, models.TrialModel.__table__.c.trial_id == trial_id)
        if not found:
            raise KeyError(models.NOT_FOUND_MSG)
        return found[0]

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlalchemy.Connection]:
        """A connection, with a database error raised as Optuna's own reads raise it (StorageInternalError), so
        that callers, and the retrying wrapper, see one kind of error whichever read failed."""
        try:
            with self.engine.connect() as connection:
                yield connection
        except sqlalchemy.exc.SQLAlchemyError as error:
            raise optuna.exceptions.StorageInternalError(f"reading trials failed: {error}") from error

    @staticmethod
    def _read(connection: sqlalchemy.Connection, where: Any) -> list[FrozenTrial]:
        """The trials matching `where` (a condition on the trials table), in trial id order."""
        models = rdb_models()
        trials = models.TrialModel.__table__
        rows = connection.execute(
            sqlalchemy.select(trials.c.trial_id, trials.c.number, trials.c.state, trials.c.datetime_start,
                              trials.c.datetime_complete).where(where).order_by(trials.c.trial_id)).all()
        if not rows:
            return []
        parts: dict[int, dict[str, Any]] = {
            row.trial_id: {"params": {}, "distributions": {}, "values": {}, "user_attrs": {}, "system_attrs": {},
                           "intermediate_values": {}} for row in rows}
        ids = sqlalchemy.select(trials.c.trial_id).where(where).scalar_subquery()

        def children(model: Any, *columns: str) -> Iterator[Any]:
            table = model.__table__
            primary = table.primary_key.columns.values()[0]
            query = (sqlalchemy.select(table.c.trial_id, *(table.c[c] for c in columns))
                     .where(table.c.trial_id.in_(ids)).order_by(primary))
            return (row for row in connection.execute(query) if row[0] in parts)

        for trial_id, name, value, text in children(models.TrialParamModel, "param_name", "param_value",
                                                    "distribution_json"):
            distribution = _distribution(text)
            parts[trial_id]["params"][name] = distribution.to_external_repr(value)
            parts[trial_id]["distributions"][name] = distribution
        to_value = models.TrialValueModel.stored_repr_to_value
        for trial_id, objective, value, kind in children(models.TrialValueModel, "objective", "value", "value_type"):
            parts[trial_id]["values"][objective] = to_value(value, kind)
        to_intermediate = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
        for trial_id, step, value, kind in children(models.TrialIntermediateValueModel, "step", "intermediate_value",
                                                    "intermediate_value_type"):
            parts[trial_id]["intermediate_values"][step] = to_intermediate(value, kind)
        for model, attrs in ((models.TrialUserAttributeModel, "user_attrs"),
                             (models.TrialSystemAttributeModel, "system_attrs")):
            for trial_id, key, text in children(model, "key", "value_json"):
                parts[trial_id][attrs][key] = json.loads(text)
        found = []
        for row in rows:
            part = parts[row.trial_id]
            values = part.pop("values")
            found.append(FrozenTrial(
                number=row.number, state=row.state, value=None,
                values=[values[k] for k in sorted(values)] if values else None,
                datetime_start=_local(row.datetime_start), datetime_complete=_local(row.datetime_complete),
                trial_id=row.trial_id, **part))
        return found

"""Each Optuna private API this project uses (search/optuna_private.py) still does what the project needs.

When an Optuna release changes one of them, a test here fails and names it, instead of a worker misbehaving.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from search.optuna_private import BaseHeartbeat, get_lock_file, register_study_artifact, study_id
from search.rdb_reads import latest_and_best
from search.storage import open_storage


def test_the_storage_wrapper_is_a_heartbeat_storage_whose_stale_trials_optuna_fails(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}", heartbeat_interval=1, grace_period=1)
    assert isinstance(storage, BaseHeartbeat)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id(study), trial.number))
    time.sleep(2.5)  # past the grace period: a dead worker's trial
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials(deepcopy=False)[0].state == TrialState.FAIL


def test_the_journal_lock_is_a_context_manager_over_the_journal_s_own_lock(tmp_path: Path) -> None:
    from optuna.storages.journal import JournalFileOpenLock

    with get_lock_file(JournalFileOpenLock(str(tmp_path / "journal.log"))):
        assert (tmp_path / "journal.log.lock").exists()
    assert not (tmp_path / "journal.log.lock").exists()


def test_the_study_id_is_the_storage_s(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    first, second = (optuna.create_study(study_name=name, storage=storage) for name in ("a", "b"))
    assert [study_id(first), study_id(second)] == [storage.get_study_id_from_name(n) for n in ("a", "b")]


def test_a_registered_artifact_reads_back_through_optuna_and_the_dashboard(tmp_path: Path) -> None:
    """Registering needs Optuna's private attribute format: this fails loudly if Optuna changes it."""
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    from search.artifacts import WeightsStore

    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    store = WeightsStore(tmp_path / "artifacts")
    artifact_id = str(uuid.uuid4())  # the dashboard's route takes hexadecimal ids with dashes only
    store.write(artifact_id, io.BytesIO(b"the weights"))
    register_study_artifact(study, artifact_id, "s-trial3.pt")
    register_study_artifact(study, artifact_id, "s-trial4.pt")  # again: replaced, not added
    metas = optuna.artifacts.get_all_artifact_meta(study)
    assert [(m.artifact_id, m.filename) for m in metas] == [(artifact_id, "s-trial4.pt")]
    optuna.artifacts.download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(tmp_path / "d"))
    assert (tmp_path / "d").read_bytes() == b"the weights"

    environ: dict = {"PATH_INFO": f"/artifacts/{storage.get_study_id_from_name('s')}/{artifact_id}"}
    setup_testing_defaults(environ)
    answer: list = []
    body = b"".join(wsgi(storage, artifact_store=store)(environ, lambda status, *_: answer.append(status)))
    assert answer[0].startswith("200") and body == b"the weights"




def _postgres_or_skip() -> str:
    import os

    url = os.environ.get("STL10_SEARCH_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("STL10_SEARCH_TEST_POSTGRES_URL is not set (.ci/postgres.sh starts a server)")
    return url


def _every_kind_of_trial(storage: optuna.storages.BaseStorage, name: str, direction: str = "maximize") -> int:
    """A study holding every state, every kind of value and parameter, nested attributes; returns its id."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    distributions = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "width": IntDistribution(8, 64, step=8),
                     "optimizer": CategoricalDistribution(["adam", "sgd", None, True, 3])}
    cases = [(TrialState.COMPLETE, 0.5), (TrialState.COMPLETE, float("inf")), (TrialState.COMPLETE, float("-inf")),
             (TrialState.COMPLETE, 0.5), (TrialState.PRUNED, None), (TrialState.FAIL, None),
             (TrialState.COMPLETE, 0.25)]
    for i, (state, value) in enumerate(cases):
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params={"lr": 10 ** -(1 + i % 4), "width": 8 * (1 + i), "optimizer":
                                              [None, "sgd", True, 3, "adam"][i % 5]},
            distributions=distributions, user_attrs={"record": {"history": [{"epoch": 1, "v": 0.1}], "seed": i}},
            system_attrs={"fixed": {"a": [1, 2]}, "i": i},
            intermediate_values={1: 0.1, 2: float("nan"), 3: float("inf"), 4: float("-inf")} if i % 2 else {}))
    running = study.ask()  # no end time, no value
    running.set_user_attr("record", {"seed": 99})
    study.enqueue_trial({"lr": 0.01})  # waiting: no start time
    return study_id(study)


def _fields(trials: list[optuna.trial.FrozenTrial]) -> str:
    """Every field of every trial, in order (dicts in their order too), NaN equal to NaN."""
    return repr([vars(t) for t in trials])


def _fast_and_optuna(url: str) -> tuple[optuna.storages.RDBStorage, optuna.storages.RDBStorage]:
    from search.rdb_reads import FastReadRDBStorage

    return FastReadRDBStorage(url), optuna.storages.RDBStorage(url)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_trials_read_with_sql_equal_the_trials_optuna_reads(tmp_path: Path, kind: str) -> None:
    """search.rdb_reads reads Optuna's tables (the `rdb_models` private API) and must build the same trials."""
    url = f"sqlite:///{tmp_path / 'studies.db'}" if kind == "sqlite" else _postgres_or_skip()
    fast, theirs = _fast_and_optuna(url)
    name = f"every-kind-{uuid.uuid4().hex[:8]}"
    sid = _every_kind_of_trial(fast, name)
    try:
        ours = fast.get_all_trials(sid, deepcopy=False)
        expected = theirs.get_all_trials(sid, deepcopy=False)
        assert len(ours) == 9 and {t.state for t in ours} == set(TrialState)
        assert _fields(ours) == _fields(expected)
        assert "nan" in _fields(ours[1:2])  # a NaN intermediate value: compared by repr, as NaN != NaN
        for trial in expected:
            assert _fields([fast.get_trial(trial._trial_id)]) == _fields([trial])
        last = expected[-1]._trial_id
        for states, included, after in [(None, set(), -1), ((TrialState.COMPLETE,), set(), -1),
                                        (None, {expected[2]._trial_id, expected[5]._trial_id}, expected[6]._trial_id),
                                        ((TrialState.RUNNING, TrialState.WAITING), set(), expected[3]._trial_id),
                                        (None, set(), last)]:
            assert (_fields(fast._get_trials(sid, states, included, after))
                    == _fields(theirs._get_trials(sid, states, included, after)))
        with pytest.raises(KeyError):
            fast.get_trial(last + 1000)
        with pytest.raises(KeyError):
            fast._get_trials(sid + 1000, None, set(), -1)
    finally:
        fast.delete_study(sid)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_best_trial_read_with_sql_is_the_earliest_of_the_best(tmp_path: Path, kind: str) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}" if kind == "sqlite" else _postgres_or_skip()
    fast, _ = _fast_and_optuna(url)
    name = f"best-{uuid.uuid4().hex[:8]}"
    sid = _every_kind_of_trial(fast, name)
    lowest = _every_kind_of_trial(fast, name + "-min", direction="minimize")
    try:
        assert fast.get_best_trial(sid).number == 1  # +inf beats every finite value
        assert fast.get_best_trial(lowest).number == 2  # -inf
        trials = fast.get_all_trials(sid, deepcopy=False)
        for trial_id in (trials[1]._trial_id, trials[2]._trial_id):  # now 0.5 at #0 and #3 ties for the best
            with fast.engine.begin() as connection:
                connection.execute(sqlalchemy.text("DELETE FROM trial_values WHERE trial_id = :id"), {"id": trial_id})
                connection.execute(sqlalchemy.text("UPDATE trials SET state = 'FAIL' WHERE trial_id = :id"),
                                   {"id": trial_id})
        assert fast.get_best_trial(sid).number == 0
        chosen = fast.latest_and_best_trials(sid, 2, 1)  # the two newest (waiting, running) and the best
        assert [t.number for t in chosen] == [0, 7, 8]
        assert _fields(chosen) == _fields(latest_and_best(fast.get_all_trials(sid, deepcopy=False), 2, 1))
    finally:
        fast.delete_study(sid)
        fast.delete_study(lowest)

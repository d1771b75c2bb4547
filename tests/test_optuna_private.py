"""Each Optuna private API this project uses (search/optuna_private.py) still does what the project needs.

When an Optuna release changes one of them, a test here fails and names it, instead of a worker misbehaving.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.optuna_private import BaseHeartbeat, get_lock_file, register_study_artifact, study_id
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



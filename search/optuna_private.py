"""Every use of an Optuna private API, in one place, each pinned by tests/test_optuna_private.py.

Optuna keeps these out of its public surface, and its next release may change any of them; the tests here
fail loudly when it does, instead of a worker misbehaving quietly. Tested with optuna 5.0.0 and
optuna-dashboard 0.21.0.

- `BaseHeartbeat`: the storage wrapper must be one, or Optuna's `fail_stale_trials` ignores its heartbeats.
- `get_lock_file`: the journal file's own lock, so that a journal append cut short can be cut back whole.
- `register_study_artifact`: Optuna's artifact metadata, written after the file (its `upload_artifact`
  registers first and writes second, so a full disk left a registered, broken file).
- `study_id`: a study's storage id without a second lookup (the uid of a study made before uids were stored).
- `rdb_models`: the tables of Optuna's RDB storage, which `search.rdb_reads` reads with SQLAlchemy Core (its ORM
  took 11 s to load 10,000 trials), overriding `RDBStorage._get_trials` and `get_trial`.
"""

from __future__ import annotations

import dataclasses
import json
import mimetypes
from typing import Any

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal._file import get_lock_file

__all__ = ["BaseHeartbeat", "get_lock_file", "rdb_models", "register_study_artifact", "study_id"]


def rdb_models() -> Any:
    """The module of Optuna's RDB models: its table objects (`TrialModel.__table__`, ...), the stored forms of
    infinite and NaN values (`TrialValueModel.stored_repr_to_value`, ...) and NOT_FOUND_MSG."""
    from optuna.storages._rdb import models

    return models


def study_id(study: optuna.Study) -> int:
    return study._study_id


def register_study_artifact(study: optuna.Study, artifact_id: str, filename: str) -> None:
    """Register a file already in the artifact store on the study, as optuna.artifacts.upload_artifact does
    (study system attribute "artifacts:<id>" holding an ArtifactMeta as JSON). Registering an id again
    replaces its metadata."""
    from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX, DEFAULT_MIME_TYPE, ArtifactMeta

    mimetype, encoding = mimetypes.guess_type(filename)
    meta = ArtifactMeta(artifact_id=artifact_id, filename=filename, mimetype=mimetype or DEFAULT_MIME_TYPE,
                        encoding=encoding)
    storage: Any = study._storage
    storage.set_study_system_attr(study._study_id, ARTIFACTS_ATTR_PREFIX + artifact_id,
                                  json.dumps(dataclasses.asdict(meta)))

"""The weights `best` saves, as Optuna artifacts: written whole or not at all, one per study, served by the dashboard.

Optuna's upload_artifact registers an artifact on the study before it writes the file, so a full disk leaves a
registered, truncated file that the dashboard offers; and a registration cannot be taken back (optuna's
get_all_artifact_meta fails on an attribute set to null). Here the file is written first (a temporary file,
synced, renamed over the target) and registered only then. Each study has one weights artifact whose id never
changes, so `best --force` replaces the file and rewrites its metadata instead of adding another.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore

from search.errors import UserError, os_reason
from search.optuna_private import register_study_artifact
from search.storage import artifact_dir
from search.studies import load_settings

_WEIGHTS_NAMESPACE = uuid.UUID("8a1f0c52-5d7e-4f0b-9a35-6f1e2b9c4d70")  # of the ids derived from study uids


class WeightsStore(FileSystemArtifactStore):
    """Optuna's file-system artifact store whose writes are whole or nothing.

    A write goes to a temporary file in the same folder, is synced, then renamed over the target: a reader
    sees the old file or the new one, never part of one. The folder is made at the first write, so reading
    commands (the dashboard on a read-only mount) need no write.
    """

    def __init__(self, folder: Path | str) -> None:
        super().__init__(folder)
        self.folder = Path(folder)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        target = self.folder / artifact_id
        temporary = self.folder / f".{artifact_id}.{os.getpid()}.tmp"
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(temporary, "wb") as file:
                shutil.copyfileobj(content_body, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        folder = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself survives a crash
        finally:
            os.close(folder)


def artifact_store(url: str, override: Path | None = None) -> WeightsStore:
    """The weights store of the storage at `url` (see `search.storage.artifact_dir`)."""
    return WeightsStore(artifact_dir(url, override))


def weights_artifact_id(study: optuna.Study) -> str:
    """The study's one weights artifact id, derived from its uid: the same at every retrain."""
    return str(uuid.uuid5(_WEIGHTS_NAMESPACE, load_settings(study).uid))


def save_weights(study: optuna.Study, trial_number: int, model: torch.nn.Module, store: WeightsStore
                 ) -> dict[str, str]:
    """The model's weights as the study's weights artifact (a finished trial takes no new attributes).

    A write that fails (a full disk) registers nothing, leaves the earlier weights as they were, and is one
    line with the OS's reason.
    """
    artifact_id = weights_artifact_id(study)
    filename = f"{study.study_name}-trial{trial_number}.pt"
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
    buffer.seek(0)
    try:
        store.write(artifact_id, buffer)
    except OSError as error:
        raise UserError(f"cannot write the weights of study {study.study_name!r} into {store.folder} "
                        f"({os_reason(error)}); nothing was registered and earlier weights are unchanged: free "
                        "some space there, or pass --artifacts DIR") from None
    register_study_artifact(study, artifact_id, filename)
    return {"artifact_id": artifact_id, "artifact_file": filename}

"""`stl10-search dashboard`: serves the storage's studies over optuna-dashboard's HTTP API, on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60  # importing torch on a busy CI machine can take a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_dashboard_serves_studies_and_artifacts(tmp_path: Path) -> None:
    from search.storage import open_storage

    url = f"sqlite:///{tmp_path}/studies.db"
    study = optuna.create_study(study_name="logreg", storage=open_storage(url), direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=2)
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"weights")
    store = optuna.artifacts.FileSystemArtifactStore(tmp_path / "artifacts")
    (tmp_path / "artifacts").mkdir()
    artifact_id = optuna.artifacts.upload_artifact(study_or_trial=study, file_path=str(weights), artifact_store=store)

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", "--port", str(port), "--storage", url],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "dashboard did not answer in time"
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["logreg"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert len(detail["trials"]) == 2
        assert [a["artifact_id"] for a in detail["artifacts"]] == [artifact_id]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/artifacts/{studies[0]['study_id']}/{artifact_id}",
                                    timeout=5) as response:
            assert response.read() == b"weights"
    finally:
        process.terminate()
        process.wait(timeout=10)

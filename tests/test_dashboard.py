"""`stl10-search dashboard`: serves the storage's studies over optuna-dashboard's HTTP API, on loopback unless told."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest

from search.dashboard import check_host
from search.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
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

    process = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", "--port", "0", "--storage", url],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines, found = [], None
        for line in process.stdout:  # the address is printed once its port is bound: nothing to race for
            lines.append(line)
            found = re.search(r"on http://127\.0\.0\.1:(\d+)/ ", line)
            if found:
                break
        assert found, "".join(lines)
        port = int(found.group(1))
        assert port != 0
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["logreg"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert len(detail["trials"]) == 2
        assert [a["artifact_id"] for a in detail["artifacts"]] == [artifact_id]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/artifacts/{studies[0]['study_id']}/{artifact_id}",
                                    timeout=60) as response:
            assert response.read() == b"weights"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_dashboard_port_is_8080_unless_told() -> None:
    from search.cli import build_parser

    assert build_parser().parse_args(["dashboard"]).port == 8080


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.1.1"])
def test_loopback_hosts_need_no_flag(host: str) -> None:
    assert check_host(host, allow_remote=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "myhost.example.org"])
def test_a_host_beyond_this_machine_needs_allow_remote_and_then_warns(host: str) -> None:
    with pytest.raises(UserError, match="--allow-remote"):
        check_host(host, allow_remote=False)
    assert "without a login" in check_host(host, allow_remote=True)


def test_dashboard_on_all_interfaces_is_refused_before_anything_is_served(tmp_path: Path, capsys) -> None:
    from search.cli import main

    url = f"sqlite:///{tmp_path}/studies.db"
    assert main(["dashboard", "--host", "0.0.0.0", "--port", "0", "--storage", url]) == 2
    error = capsys.readouterr().err
    assert error.startswith("stl10-search: error: --host 0.0.0.0") and "--allow-remote" in error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not (tmp_path / "studies.db").exists()

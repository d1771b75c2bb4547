"""Provenance: what made a result (versions, commit, machine, command), collected without failing anywhere."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from search import provenance as provenance_module
from search.provenance import git_state, package_versions, provenance, redacted_command


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    folder = tmp_path / "checkout"
    folder.mkdir()
    _git(folder, "init", "-q")
    (folder / "module.py").write_text("x = 1\n")
    _git(folder, "add", "module.py")
    _git(folder, "commit", "-q", "-m", "first")
    return folder


def test_every_field_is_present_and_the_whole_serialises_to_json() -> None:
    found = provenance().as_dict()
    assert set(found) == {"python", "packages", "git_commit", "git_dirty", "cuda", "gpus", "cpu", "threads",
                          "hostname", "platform", "command"}
    assert set(found["packages"]) == {"torch", "torchvision", "optuna", "optuna-dashboard", "stl10-search"}
    assert found["packages"]["torch"] == torch.__version__  # with its build tag, e.g. 2.14.1+cu130
    assert found["python"] == ".".join(map(str, sys.version_info[:3]))
    assert found["threads"] == torch.get_num_threads() and found["cpu"] and found["hostname"]
    assert json.loads(json.dumps(found)) == found


def test_the_checkout_it_runs_from_gives_its_commit() -> None:
    """The suite runs from a git checkout (a worktree too): the commit is HEAD's, whatever the folder."""
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    assert provenance().git_commit == head.stdout.strip()


def test_a_git_checkout_gives_its_commit_and_whether_it_has_local_changes(checkout: Path) -> None:
    commit = _git(checkout, "rev-parse", "HEAD")
    assert git_state(checkout) == {"commit": commit, "dirty": False}
    (checkout / "module.py").write_text("x = 2\n")
    assert git_state(checkout) == {"commit": commit, "dirty": True}


def test_a_folder_inside_someone_elses_checkout_is_not_a_checkout(checkout: Path) -> None:
    """An installed copy in a virtual environment inside another project must not report that project's commit."""
    inner = checkout / "venv" / "site-packages"
    inner.mkdir(parents=True)
    assert git_state(inner) is None


def test_no_checkout_and_no_git_give_none_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert git_state(tmp_path) is None
    assert git_state(tmp_path / "does-not-exist") is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert git_state(REPO_ROOT) is None


def test_a_package_not_installed_is_unknown() -> None:
    assert package_versions(["optuna", "no-such-package-xyz"]) == {"optuna": importlib.metadata.version("optuna"),
                                                                   "no-such-package-xyz": "unknown"}


def test_credentials_in_the_command_line_are_redacted() -> None:
    argv = ["stl10-search", "search", "--storage", "postgresql://user:secret@db:5432/studies",
            "--warm-start=postgresql://u:hunter2@h/db?sslpassword=x#logreg", "--param", "lr=0.001"]
    assert redacted_command(argv) == ["stl10-search", "search", "--storage", "postgresql://user:***@db:5432/studies",
                                      "--warm-start=postgresql://u:***@h/db?sslpassword=***#logreg",
                                      "--param", "lr=0.001"]


def test_it_is_collected_once_per_process_and_initialises_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(provenance_module, "git_state", lambda folder: calls.append(folder))
    provenance_module._static.cache_clear()
    try:
        first, second = provenance(), provenance()
    finally:
        provenance_module._static.cache_clear()
    assert len(calls) == 1 and first == second
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized() and first.gpus == []
    assert first.cuda == torch.version.cuda  # the build's CUDA (None for a CPU build of torch)

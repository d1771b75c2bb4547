"""Paths and names from the user's world: bytes that are not UTF-8, spaces, HTML in a class name, a folder as
space file, a file path as storage, a class with too few images."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import torch

from search.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent
HTML_CLASS = "<img src=x onerror=alert(1)>"


def _one_line(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stl10-search: error: ") and err.strip().count("\n") == 0, err
    for word in words:
        assert word in last, (word, last)


def _dataset(source: Path, root: Path, renames: dict[str, str]) -> Path:
    """A copy of the tiny ImageFolder at `root`, with class folders renamed in train and test alike."""
    try:
        shutil.copytree(source, root)
        for part in ("train", "test"):
            for old, new in renames.items():
                (root / part / old).rename(root / part / new)
    except OSError as error:  # a file system that takes only UTF-8 names (ZFS utf8only, some mounts)
        pytest.skip(f"this file system refuses the name: {error}")
    return root


def _search_and_test(root: Path, folder: Path, cache: Path) -> str:
    """search (2 one-epoch logreg trials, worked here), then best; returns the storage URL."""
    from search.storage import open_storage
    from search.worker import work

    url = f"sqlite:///{folder / 'studies.db'}"
    assert main(["search", "--model", "logreg", "--n-trials", "2", "--workers", "0", "--param", "epochs=1",
                 "--dataset", "imagefolder", "--data-root", str(root), "--image-size", "16", "--cache-dir", str(cache),
                 "--storage", url]) == 0
    assert work(open_storage(url), ["logreg"], torch.device("cpu"), threading.Event(),
                data_overrides={"cache_dir": cache}, log=lambda message: None) == {"logreg": 2}
    assert main(["best", "--storage", url, "--cache-dir", str(cache)]) == 0
    return url


def test_paths_and_class_names_that_are_not_utf8_work_from_search_to_report(tiny_imagefolder: Path,
                                                                             tmp_path: Path) -> None:
    """Data folder, class folder, cache folder and report folder with bytes that are not UTF-8, and spaces."""
    not_utf8 = os.fsdecode(b"circ\xe9le")  # Latin-1, as an old archive or a Windows share may hold
    root = _dataset(tiny_imagefolder, tmp_path / os.fsdecode(b"my data \xff"), {"circle": not_utf8})
    url = _search_and_test(root, tmp_path, tmp_path / os.fsdecode(b"cache \xfe"))
    out = tmp_path / os.fsdecode(b"report \xfd")
    report = subprocess.run([sys.executable, "-m", "search.cli", "report", "--out", os.fsencode(out), "--storage", url,
                             "--cache-dir", os.fsencode(tmp_path / os.fsdecode(b"cache \xfe"))], cwd=REPO_ROOT,
                            capture_output=True, timeout=300)  # a real stdout, which takes only UTF-8
    assert report.returncode == 0, report.stderr.decode(errors="replace")
    assert b"report \\xfd" in report.stdout

    classes = sorted(p.name for p in (root / "train").iterdir())
    for name in ("report.md", "report.html", "trials.csv", "summary.csv"):
        (out / name).read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert "| circ\\xe9le |" in (out / "report.md").read_text() and "my data \\xff" in (out / "report.md").read_text()
    assert "<td>circ\\xe9le</td>" in (out / "report.html").read_text()
    stored = json.loads((out / "report.json").read_text())["studies"][0]
    assert stored["best_result"]["classes"] == classes  # JSON keeps the names exactly
    study = optuna.load_study(study_name="logreg", storage=url)
    assert study.user_attrs["data_identity"]["classes"] == classes
    assert study.user_attrs["settings"]["data"]["data_root"] == str(root)


def test_class_names_are_escaped_in_markdown_as_in_html(tiny_imagefolder: Path, tmp_path: Path) -> None:
    root = _dataset(tiny_imagefolder, tmp_path / "my data", {"cross": HTML_CLASS})
    url = _search_and_test(root, tmp_path, tmp_path / "cache")
    assert main(["report", "--out", str(tmp_path / "report"), "--storage", url, "--format", "md,html"]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| &lt;img src=x onerror=alert(1)&gt; |" in markdown
    assert "<img src=x" not in markdown
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in page and HTML_CLASS not in page


@pytest.mark.parametrize("make, words", [
    (lambda folder: folder.mkdir() or folder, ("is a folder", "pass a TOML file")),
    (lambda folder: folder, ("does not exist",)),
])
def test_a_space_file_that_is_a_folder_or_missing_is_one_line(tmp_path: Path, capsys, make, words) -> None:
    space = make(tmp_path / "space.toml")
    assert main(["search", "--model", "logreg", "--workers", "0", "--space", str(space),
                 "--storage", f"sqlite:///{tmp_path / 'studies.db'}"]) == 2
    _one_line(capsys.readouterr().err, f"space file {space}", *words)
    assert not (tmp_path / "studies.db").exists()


@pytest.mark.parametrize("value, meant", [
    ("studies.db", "sqlite:///studies.db"),
    ("/tmp/x.db", "sqlite:////tmp/x.db"),
    ("runs/journal.log", "journal:runs/journal.log"),
])
@pytest.mark.parametrize("command", [["report"], ["search", "--model", "logreg", "--workers", "0"]])
def test_a_file_path_as_storage_asks_whether_the_url_was_meant(capsys, value: str, meant: str,
                                                               command: list[str]) -> None:
    assert main([*command, "--storage", value]) == 2
    _one_line(capsys.readouterr().err, repr(value), f"did you mean {meant}?")


def test_a_class_with_too_few_images_is_named_in_a_warning(caplog) -> None:
    from data.splits import _warn_once, stratified_split

    _warn_once.cache_clear()
    labels = torch.tensor([0] * 20 + [1] * 1 + [2] * 3 + [3] * 20)
    with caplog.at_level(logging.WARNING):
        train, val = stratified_split(labels, 0.3, 0, classes=("cat", "lonely", "few", "dog"))
    assert len(train) + len(val) == len(labels)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "lonely (1: 1 train, 0 validation)" in warning and "few (3: 2 train, 1 validation)" in warning
    assert "cat" not in warning and "dog" not in warning


def test_a_search_on_a_class_of_one_image_warns_and_goes_on(tiny_imagefolder: Path, tmp_path: Path,
                                                             caplog) -> None:
    from data.splits import _warn_once

    _warn_once.cache_clear()
    root = _dataset(tiny_imagefolder, tmp_path / "data", {})
    for extra in sorted((root / "train" / "vertical").iterdir())[1:]:
        extra.unlink()
    with caplog.at_level(logging.WARNING):
        assert main(["search", "--model", "logreg", "--workers", "0", "--n-trials", "1", "--dataset", "imagefolder",
                     "--data-root", str(root), "--image-size", "16", "--cache-dir", str(tmp_path / "cache"),
                     "--storage", f"sqlite:///{tmp_path / 'studies.db'}"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "too few train images" in r.getMessage()]
    assert len(warnings) == 1 and "vertical (1: 1 train, 0 validation)" in warnings[0]

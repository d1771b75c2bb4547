"""The Python API (search.api): the README's notebook example runs as written, end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT


def _notebook_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "retrain_best(" in b]
    return block


def test_the_api_exports_what_the_commands_call() -> None:
    import search.api
    from search.services import results, searching

    assert set(search.api.__all__) >= {"create_studies", "run_workers", "search", "retrain_best", "load_best",
                                        "load_bundle", "predict", "export"}
    assert search.api.search is searching.search and search.api.retrain_best is results.retrain_best
    assert all(hasattr(search.api, name) for name in search.api.__all__)


@pytest.mark.slow
def test_the_readme_notebook_example_searches_retrains_loads_and_predicts(tiny_imagefolder: Path, tmp_path: Path
                                                                          ) -> None:
    """Search 2 trials with a worker process, retrain the best, load it, predict the test folder: the predictions
    give exactly the accuracy `best` measured."""
    code = _notebook_example().replace("DATA_ROOT", str(tiny_imagefolder))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    best, predicted = re.search(r"best: ([\d.]+%) on test; predict: ([\d.]+%)", done.stdout).groups()
    assert best == predicted
    assert "logreg" in done.stdout and (tmp_path / "notebook.db").is_file()

"""The service run the way users run it: from their own project folder, with its own `data/` and `models/`,
through the installed command, and with a search that goes wrong in ordinary ways."""

from __future__ import annotations

import fcntl
import os
import re
import select
import shlex
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from search.launcher import search_failures

COMMAND = Path(sys.executable).parent / "stl10-search"


def user_project(folder: Path) -> Path:
    """A user's ML project: their own `data` package, a `models` folder without __init__.py, a `models.py`
    and a `search` folder, every one a name this project's packages also have."""
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "__init__.py").write_text("IMAGES = 'the user's own'\n")
    (folder / "models").mkdir()
    (folder / "models" / "resnet.py").write_text("WIDTH = 64\n")
    (folder / "models.py").write_text("raise ImportError('the user models.py was imported')\n")
    (folder / "search").mkdir()
    return folder


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)


def _tiny_run(tiny_imagefolder: Path, folder: Path) -> list[str]:
    return ["run", "--model", "logreg", "--n-trials", "2", "--param", "epochs=1", "--workers", "1",
            "--dataset", "imagefolder", "--data-root", str(tiny_imagefolder), "--image-size", "16",
            "--cache-dir", str(folder / "cache"), "--storage", f"sqlite:///{folder / 'studies.db'}"]


def _assert_whole_run(done: subprocess.CompletedProcess, project: Path) -> None:
    logs = "\n".join(p.read_text() for p in (project / "logs").glob("*.log"))
    assert done.returncode == 0, done.stderr + logs
    assert "logreg: test accuracy" in done.stdout
    assert (project / "report" / "report.html").is_file()
    assert "ImportError" not in logs and "Traceback" not in logs


@pytest.mark.slow
def test_search_best_and_report_run_from_a_folder_with_its_own_data_and_models(tiny_imagefolder: Path,
                                                                               tmp_path: Path) -> None:
    """The editable install that `make` does: before, every worker died on `from data import DATASETS`."""
    project = user_project(tmp_path / "my_project")
    done = _run([str(COMMAND), *_tiny_run(tiny_imagefolder, project)], cwd=project)
    _assert_whole_run(done, project)


@pytest.mark.slow
def test_a_regular_install_runs_from_such_a_folder_too(tiny_imagefolder: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                      "--target", str(site), str(REPO_ROOT)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    project = user_project(tmp_path / "my_project")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = _run([sys.executable, str(site / "bin" / "stl10-search"), *_tiny_run(tiny_imagefolder, project)],
                cwd=project, env=env)
    _assert_whole_run(done, project)
    assert f"{site}/search/" in _run([sys.executable, "-P", "-c", "import search; print(search.__file__)"],
                                      cwd=project, env=env).stdout  # the installed copy ran, not the checkout


FAILING_FAMILY = '''
from torch import nn

from search.family import Family
from search.training import training_space


class Fragile(nn.Module):
    """Fine in eval mode (the check before the search), broken in training."""

    def __init__(self, num_classes):
        super().__init__()
        self.linear = nn.Linear(3, num_classes)

    def forward(self, x):
        if self.training:
            raise RuntimeError("cannot train on purpose")
        return self.linear(x.mean((2, 3)))


FRAGILE = Family(name="fragile", title="fragile net", build=lambda p, n, s, w: Fragile(n), image_size=16,
                 space=training_space(batch_sizes=(8,), epochs=2), n_trials=3)
'''


@pytest.mark.slow
def test_a_search_whose_every_trial_failed_exits_non_zero_and_run_stops(tiny_imagefolder: Path, tmp_path: Path) -> None:
    family = tmp_path / "fragile.py"
    family.write_text(FAILING_FAMILY)
    common = ["--model", "fragile", "--family-file", str(family), "--workers", "1", "--dataset", "imagefolder",
              "--data-root", str(tiny_imagefolder), "--cache-dir", str(tmp_path / "cache"),
              "--storage", f"sqlite:///{tmp_path / 'studies.db'}"]
    searched = _run([str(COMMAND), "search", *common], cwd=tmp_path)
    assert searched.returncode == 1, searched.stderr
    assert ("stl10-search: fragile: no trial finished; 3 failed, 3 of them with: failed: RuntimeError: cannot train "
            "on purpose") in searched.stderr
    ran = _run([str(COMMAND), "run", *common, "--out", str(tmp_path / "report")], cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    assert "the search finished no trial" in ran.stderr
    assert not (tmp_path / "report").exists()  # no report of nothing
    assert "Traceback" not in searched.stderr + ran.stderr


def test_workers_that_die_are_reported_with_their_error_and_real_log_file(tmp_path: Path) -> None:
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    crash = "import sys; print('Traceback (most recent call last):'); print(\"ImportError: cannot import name 'DATASETS'\"); sys.exit(1)"
    processes = []
    for log in logs:
        with log.open("w") as out:
            processes.append(subprocess.Popen([sys.executable, "-c", crash], stdout=out))
    for process in processes:
        process.wait()
    (problem,) = search_failures(processes, logs, [])
    assert problem == (f"2 of 2 worker(s) exited with an error: ImportError: cannot import name 'DATASETS' "
                       f"(2 of them); see {logs[0].resolve()}")


def _three_model_search(tiny_imagefolder: Path, folder: Path) -> list[str]:
    return [str(COMMAND), "search", "--model", "logreg,mlp,cnn", "--n-trials", "1", "--param", "epochs=1",
            "--param", "mlp.width_1=64", "--workers", "1", "--dataset", "imagefolder", "--data-root",
            str(tiny_imagefolder), "--image-size", "16", "--cache-dir", str(folder / "cache"),
            "--storage", f"sqlite:///{folder / 'studies.db'}", "--log-dir", str(folder / "logs")]


@pytest.mark.slow
def test_search_piped_into_cat_shows_every_model_in_plain_lines(tiny_imagefolder: Path, tmp_path: Path) -> None:
    done = _run(["bash", "-c", " ".join(map(shlex.quote, _three_model_search(tiny_imagefolder, tmp_path)))
                 + " 2>&1 | cat"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    assert "\r" not in done.stdout and "\x1b" not in done.stdout
    for model in ("logreg", "mlp", "cnn"):
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] {model}: 1/1 finished", done.stdout, re.MULTILINE), model


@pytest.mark.slow
def test_search_on_an_80_column_terminal_shows_every_model(tiny_imagefolder: Path, tmp_path: Path) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(_three_model_search(tiny_imagefolder, tmp_path), cwd=tmp_path, stdin=slave,
                               stdout=slave, stderr=slave, env=dict(os.environ, TERM="xterm"), start_new_session=True)
    os.close(slave)
    shown = b""
    while True:
        ready = select.select([master], [], [], 1.0)[0]
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # the terminal closed: the process is gone
            break
        shown += chunk
        if not ready and process.poll() is not None:
            break
    os.close(master)
    assert process.wait(timeout=60) == 0, shown.decode(errors="replace")[-3000:]
    progress = shown.decode().partition("study ")[0]  # what came before the closing summary table
    visible = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", part) for part in re.split(r"[\r\n]", progress)]
    bars = [part for part in visible if re.match(r"(logreg|mlp|cnn) +\d|search: ", part)]
    assert bars and max(map(len, bars)) <= 80  # a progress line never wraps, so the bars redraw in place
    for model in ("logreg", "mlp", "cnn"):
        assert any(re.match(rf"{model} +1/1 ", part) for part in bars), model

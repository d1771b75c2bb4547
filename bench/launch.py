"""Running the project's command line from a benchmark, as a user would: `python -m search.cli ...`.

The checkout is put first on PYTHONPATH (what is already there, such as a GPU box's /tmp/site, is kept),
the output goes to a log file, and a command past its time limit is stopped as Ctrl-C stops it (SIGTERM:
the launcher asks its workers to finish their epoch), then asked again (workers killed), then killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def run_cli(arguments: list[str], log_path: Path, timeout: float | None = None, cwd: Path | None = None
            ) -> tuple[int, float]:
    """`python -m search.cli *arguments`, output appended to `log_path`; returns (exit code, wall seconds).

    A command stopped at `timeout` returns its own exit code (130 after a clean stop) or -9 when killed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"$ python -m search.cli {' '.join(arguments)}\n")
        log.flush()
        process = subprocess.Popen([sys.executable, "-m", "search.cli", *arguments], cwd=cwd or log_path.parent,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=cli_environment())
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = stop(process)
            print(f"  `{' '.join(arguments[:3])} ...` passed its {timeout:.0f}s limit and was stopped (exit {code})",
                  file=sys.stderr, flush=True)
        except BaseException:
            stop(process)
            raise
    return code, time.perf_counter() - started


def stop(process: subprocess.Popen) -> int:
    """SIGTERM (a launcher stops its workers after their epoch), SIGTERM again (it kills them), then SIGKILL."""
    for wait in (30, 10):
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
    if process.poll() is None:
        process.kill()
    return process.wait()


def tail(log_path: Path, lines: int = 15) -> str:
    """The last lines of a log, indented, for a failure message."""
    text = log_path.read_text(errors="replace").splitlines()[-lines:] if log_path.is_file() else []
    return "\n".join(f"    {line}" for line in text)

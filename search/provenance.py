"""What made a result: package versions, the project's commit, the machine and the exact command line.

Collected once per process (`provenance()`) and kept as a plain dict that JSON-serialises, so a bundle's
config.json (and later a study, a trial and a best result) says which code, packages and hardware made its
numbers. Nothing here fails: what cannot be found is "unknown" or None.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from search.storage import redact

PACKAGES = ("torch", "torchvision", "optuna", "optuna-dashboard", "stl10-search")
GIT_TIMEOUT_S = 2.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the search package


@dataclass(frozen=True)
class Provenance:
    """One process's answer to "what made this": see `provenance()`."""

    python: str
    packages: dict[str, str]  # distribution name -> version, "unknown" when not installed
    git_commit: str | None  # None: not run from a git checkout (an installed package), or git is absent
    git_dirty: bool | None  # the checkout had changes not committed (untracked files not ignored count)
    cuda: str | None  # the CUDA version torch was built with; None for a CPU build
    gpus: list[str]  # names of the visible GPUs, [] when none is usable; their count is len(gpus)
    cpu: str
    threads: int  # torch's intra-op threads when collected
    hostname: str
    platform: str
    command: list[str]  # sys.argv, storage URL credentials redacted

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def host(self) -> dict[str, Any]:
        """What ran one trial, kept on its record: the machine, its GPUs or CPU, the threads and the commit."""
        return {"hostname": self.hostname, "gpus": self.gpus, "cpu": self.cpu, "threads": self.threads,
                "git_commit": self.git_commit, "git_dirty": self.git_dirty}


def describe(stored: dict[str, Any]) -> list[str]:
    """A stored provenance (`Provenance.as_dict()`) as lines for a reader: versions, code, machine, command."""
    packages = stored.get("packages") or {}
    versions = ", ".join([f"Python {stored.get('python', '?')}",
                          *(f"{name} {version}" for name, version in packages.items())])
    commit = stored.get("git_commit")
    code = (f"git commit {commit[:12]}" + (" with local changes" if stored.get("git_dirty") else "") if commit
            else "not a git checkout (an installed package)")
    gpus = stored.get("gpus") or []
    machine = (f"{len(gpus)} x {gpus[0]}" + (f" (CUDA {stored['cuda']})" if stored.get("cuda") else "") if gpus
               else f"CPU {stored.get('cpu', '?')}, {stored.get('threads', '?')} thread(s)")
    return [f"Versions: {versions}", f"Code: {code}", f"Machine: {machine} on {stored.get('hostname', '?')}",
            f"Command: {' '.join(stored.get('command') or []) or '?'}"]


_COMMAND: list[str] | None = None  # the command line `search.cli.main` ran, when it ran one


def record_command(argv: Sequence[str]) -> None:
    """The command this process runs (`stl10-search` and its arguments), when it is not sys.argv: a command
    line run by `search.cli.main(argv)` from Python, a notebook or a test."""
    global _COMMAND
    _COMMAND = redacted_command(["stl10-search", *argv])


def provenance() -> Provenance:
    """This process's provenance; everything but the thread count and the command is collected on the first
    call only."""
    return dataclasses.replace(_static(), threads=torch.get_num_threads(),
                               command=_COMMAND or redacted_command(sys.argv))


@functools.lru_cache(maxsize=1)
def _static() -> Provenance:
    git = git_state(PROJECT_ROOT)
    return Provenance(
        python=platform.python_version(),
        packages=package_versions(),
        git_commit=git["commit"] if git else None,
        git_dirty=git["dirty"] if git else None,
        cuda=torch.version.cuda,
        gpus=gpu_names(),
        cpu=cpu_model(),
        threads=torch.get_num_threads(),
        hostname=socket.gethostname(),
        platform=platform.platform(),
        command=redacted_command(sys.argv),
    )


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions; torch's and torchvision's as they report themselves, with the build tag (2.14.1+cu130)
    that their package metadata leaves out."""
    import torchvision

    built = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    versions = {}
    for name in names:
        try:
            versions[name] = built.get(name) or importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def git_state(folder: Path) -> dict[str, Any] | None:
    """{"commit": sha, "dirty": bool} when `folder` is the top of a git checkout, else None (never an error).

    The top is required, not just any enclosing checkout: an installed package inside someone else's
    repository (a virtual environment in a project folder) must not report that project's commit.
    """
    top = _git(folder, "rev-parse", "--show-toplevel", "HEAD")
    if top is None:
        return None
    lines = top.splitlines()
    if len(lines) != 2 or Path(lines[0]).resolve() != Path(folder).resolve():
        return None
    status = _git(folder, "status", "--porcelain")
    return {"commit": lines[1], "dirty": bool(status.strip()) if status is not None else None}


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git, a folder that vanished, a hung git
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def gpu_names() -> list[str]:
    """The visible GPUs' names; [] without a usable GPU (is_available() creates no CUDA context)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def cpu_model() -> str:
    """/proc/cpuinfo's "model name" (Linux), else platform.processor(), else "unknown"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def redacted_command(argv: Sequence[str]) -> list[str]:
    """The command line with the credentials of any URL in it (`--storage URL`, `--storage=URL`) replaced by ***."""
    words = []
    for word in argv:
        flag, equals, value = word.partition("=") if word.startswith("-") else ("", "", word)
        if "://" in value:
            word = f"{flag}{equals}{redact(value)}"
        words.append(word)
    return words

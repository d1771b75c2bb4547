"""The error the data package raises for the user, and the datasets it reads, in a module that imports nothing heavy
(the command line lists and checks them without importing torch)."""

from __future__ import annotations

import os
from pathlib import Path

DATASETS = ("stl10", "imagefolder")


class DataError(Exception):
    """A user-facing data problem; str(e) is one actionable line (folder, file, expected size, how to fix)."""


def default_data_root(dataset: str) -> Path:
    """Where a dataset lives when no folder is given: $XDG_CACHE_HOME (or ~/.cache)/stl10-search/<dataset>."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "stl10-search" / dataset

"""Environment variables that stand in for common flags, and the defaults the command line and the library share.

Imports nothing heavy: the command line reads it to build --help.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORAGE = "sqlite:///studies.db"
STORAGE_ENV = "STL10_SEARCH_STORAGE"  # --storage
DEVICE_ENV = "STL10_SEARCH_DEVICE"  # --device
CACHE_DIR_ENV = "STL10_SEARCH_CACHE_DIR"  # --cache-dir
DATA_ROOT_ENV = "STL10_SEARCH_DATA_ROOT"  # --data-root
ARTIFACTS_ENV = "STL10_SEARCH_ARTIFACTS"  # --artifacts


def from_environment(name: str) -> str | None:
    """The variable's value, None when unset or empty."""
    return os.environ.get(name) or None


def path_from_environment(name: str) -> Path | None:
    value = from_environment(name)
    return Path(value) if value else None

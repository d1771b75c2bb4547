"""The Python API: what the command line does, as functions a notebook can call. Import from here only.

    from search.api import DataConfig, SearchRequest, search, retrain_best, BestRequest, load_best, predict

Each function takes the typed request its command builds (`search.commands` only turns arguments into these),
so the command line and this API cannot drift apart. Everything else in the package may change.
"""

from __future__ import annotations

from pathlib import Path

from search.bundle import load_bundle
from search.environment import DEFAULT_STORAGE
from search.pipeline import DataConfig
from search.predict import LoadedModel, Predictions, predict
from search.records import BestResult, TrialRecord
from search.services import results
from search.services.results import (BestOutcome, BestRequest, ExportRequest, ReportRequest, StudiesRequest, Tested,
                                     export, retrain_best, write_report)
from search.services.searching import SearchOutcome, SearchRequest, create_studies, run_workers, search


def load_best(storage: str = DEFAULT_STORAGE, model: str = "logreg", *, study_prefix: str = "",
              artifacts: Path | None = None) -> LoadedModel:
    """The model `best` stored for `model`'s study: (network, preprocess, classes, config), ready for `predict`."""
    return results.load_best(StudiesRequest(storage=storage, models=[model], study_prefix=study_prefix,
                                            artifacts=artifacts))


__all__ = [
    "BestOutcome",
    "BestRequest",
    "BestResult",
    "DataConfig",
    "ExportRequest",
    "LoadedModel",
    "Predictions",
    "ReportRequest",
    "SearchOutcome",
    "SearchRequest",
    "StudiesRequest",
    "Tested",
    "TrialRecord",
    "create_studies",
    "export",
    "load_best",
    "load_bundle",
    "predict",
    "retrain_best",
    "run_workers",
    "search",
    "write_report",
]

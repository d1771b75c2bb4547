"""`stl10-search track`: send finished studies, as stored, to experiment trackers (MLflow, TensorBoard, W&B)."""

from __future__ import annotations

import argparse

import optuna

from search.commands.options import models, say, storage_url
from search.errors import UserError
from search.records import BestResult
from search.storage import open_storage, redact, storage_file
from search.studies import existing_study_names, load_stored_families, study_name
from search.trackers import open_trackers, replay


def run_track(args: argparse.Namespace) -> int:
    """Each chosen study's finished trials and tested best, in trial order; exit 1 when a tracker failed."""
    url = storage_url(args)
    path = storage_file(url)
    if path is not None and not path.is_file():
        raise UserError(f"no storage file {path}; pass --storage with the URL the search used")
    storage = open_storage(url)
    load_stored_families(storage)
    existing = set(existing_study_names(storage))
    names = [study_name(f, args.study_prefix) for f in models(args)]
    missing = [n for n in names if n not in existing]
    if missing and args.model.strip() != "all":
        raise UserError(f"no study {', '.join(map(repr, missing))} in storage {redact(url)}; "
                        f"studies there: {', '.join(sorted(existing)) or 'none'}")
    names = [n for n in names if n in existing]
    if not names:
        raise UserError(f"no stl10-search studies in storage {redact(url)}")
    trackers = open_trackers(args.track, say)
    try:
        for name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            sent = replay(study, trackers)
            tested = "and its tested best " if BestResult.load(study) is not None else ""
            print(f"{name}: {sent} finished trial(s) {tested}sent to {', '.join(trackers.trackers)}", flush=True)
    finally:
        trackers.close()
    return 1 if trackers.failures else 0

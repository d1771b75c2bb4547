"""Warm starts: the best settings of an earlier study, made to fit the current space, queued as first trials.

The earlier study may live in another storage, or have searched another dataset or a different space: a
parameter the current space lacks is dropped, a value outside its range is clipped to it (or moved to the
nearest numeric choice), and the user is told which.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import optuna

from search.errors import UserError
from search.space import Dim
from search.storage import open_storage, redact, storage_file
from search.records import TrialRecord, trial_params
from search.studies import SETTINGS_ATTR, existing_study_names, stored_studies


def parse_source(text: str) -> tuple[str, str | None]:
    """"URL#STUDY" -> (URL, STUDY); a plain URL -> (URL, None)."""
    url, _, name = text.partition("#")
    if not url.strip():
        raise UserError(f"--warm-start takes URL[#STUDY], e.g. sqlite:///old.db#cnn; got {text!r}")
    return url.strip(), name.strip() or None


def source_study(url: str, name: str | None, study_name: str, family: str) -> optuna.Study:
    """The earlier study: the one named, else one of the same name, else the only one of the same family."""
    path = storage_file(url)
    if path is not None and not path.is_file():
        raise UserError(f"--warm-start: no storage file {path}")
    storage = open_storage(url, read_only=True)  # a source is only read: it may be a shared, read-only file
    names = existing_study_names(storage)
    if name is None:
        if study_name in names:
            name = study_name
        else:
            same_family = [s.study_name for s in stored_studies(storage)
                           if (s.user_attrs.get(SETTINGS_ATTR) or {}).get("family") == family]
            if len(same_family) != 1:
                raise UserError(f"--warm-start: {redact(url)} has no study {study_name!r} and "
                                f"{len(same_family)} studies of model {family}; name one with {redact(url)}#STUDY")
            name = same_family[0]
    elif name not in names:
        raise UserError(f"--warm-start: no study {name!r} in {redact(url)}; there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)


def fit_to_space(params: dict[str, Any], dims: list[Dim]) -> tuple[dict[str, Any], list[str]]:
    """`params` restricted to `dims`: (the fitted values, one note per dropped, clipped or moved value).

    Dimensions are read in order, so a condition (a 4th width needs n_layers >= 4) sees the fitted values.
    A dimension the earlier setting lacks is left to the sampler.
    """
    fitted: dict[str, Any] = {}
    notes = [f"{name} dropped (not in this space)" for name in params if name not in {d.name for d in dims}]
    for dim in dims:
        if dim.name not in params or not dim.active(fitted):
            continue
        value = params[dim.name]
        if dim.choices is not None:
            if value in dim.choices:
                fitted[dim.name] = value
            elif not dim.named and not dim.boolean and isinstance(value, (int, float)):
                nearest = min(dim.choices, key=lambda c: abs(math.log(c / value)) if c > 0 and value > 0
                              else abs(c - value))
                fitted[dim.name] = nearest
                notes.append(f"{dim.name} {value} -> {nearest} (nearest choice)")
            else:
                notes.append(f"{dim.name} dropped ({value!r} is not among {dim.describe()})")
            continue
        clipped = min(max(value, dim.low), dim.high)
        if dim.integer:
            clipped = int(round(clipped))
        if clipped != value:
            notes.append(f"{dim.name} {value:g} -> {clipped:g} (clipped to {dim.describe()})")
        fitted[dim.name] = clipped
    return fitted, notes


def warm_start(study: optuna.Study, dims: list[Dim], family: str, source: str, k: int,
               log: Callable[[str], None]) -> int:
    """Queue the top `k` completed settings of the source study, fitted to `dims`; returns how many were queued."""
    if k < 1:
        raise UserError(f"--warm-start-k must be at least 1, got {k}")
    url, name = parse_source(source)
    earlier = source_study(url, name, study.study_name, family)
    complete = [t for t in earlier.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    best = sorted(complete, key=lambda t: (-t.value, t.number))[:k]
    if not best:
        raise UserError(f"--warm-start: study {earlier.study_name!r} in {redact(url)} has no completed trial")
    notes: dict[str, int] = {}
    for trial in best:
        fitted, changed = fit_to_space(trial_params(trial), dims)
        for note in changed:
            notes[note] = notes.get(note, 0) + 1
        origin = TrialRecord(warm_start=f"{redact(url)}#{earlier.study_name} trial #{trial.number}")
        study.enqueue_trial(fitted, user_attrs=origin.user_attrs(), skip_if_exists=True)
    log(f"[{study.study_name}] warm start: queued the {len(best)} best settings of {redact(url)}#"
        f"{earlier.study_name} (validation {best[0].value:.2%} down to {best[-1].value:.2%})"
        + ("; " + "; ".join(f"{note}" + (f" ({n}x)" if n > 1 else "") for note, n in notes.items()) if notes else ""))
    return len(best)

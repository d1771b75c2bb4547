"""`stl10-search report`: every study of the tool in one storage, written as Markdown, HTML, JSON and CSV.

Files written into the output folder:
  report.md (+ images/*.png), report.html (self-contained), report.json, best_params.json,
  trials.csv and summary.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import optuna

from data import DataError, load_images, printable
from search.errors import UserError
from search.provenance import describe
from search.records import TrialRecord
from search.studies import PROVENANCE_ATTR, state_name
from search.report.collect import StudyReport, collect, trial_reason, trial_seconds
from search.report.html import render_html
from search.report.markdown import render_markdown
from search.report.pictures import PICTURE_SIZE, augmentation_picture, data_grid
from search.report.tables import summary_csv

FORMATS = ("md", "html", "json", "csv")
PICTURES = {"data_grid.png": "4 random train images per class", "augmentation.png":
            "augmentation, one lever per row: original vs flipped, rotated by 8 degrees, translated by an eighth of "
            "the side, and with a quarter of the side cut out"}


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown report format {', '.join(unknown) or repr(text)}; choose from {', '.join(FORMATS)}")
    return formats


def data_pictures(report: StudyReport, cache_dir: Path | None, log: Callable[[str], None]) -> dict[str, bytes]:
    """PNG bytes of the data grid and the augmentation picture, or none when the data cannot be read here."""
    config = report.settings.data_config(cache_dir=cache_dir)
    try:
        images = load_images(config.dataset, config.data_root, "train", PICTURE_SIZE, config.cache_dir)
    except DataError as error:
        log(f"report: no data pictures ({error})")
        return {}
    pictures = {}
    for name, picture in (("data_grid.png", data_grid(images)), ("augmentation.png", augmentation_picture(images))):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        pictures[name] = buffer.getvalue()
    return pictures


def _trial_json(report: StudyReport, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial as report.json and trials.csv give it: where it belongs, its state and value, then its record
    (with the reason and seconds a report derives for trials whose worker died)."""
    record = report.record(trial)
    record = dataclasses.replace(record, params=record.params_of(trial), reason=trial_reason(trial, record),
                                 seconds=trial_seconds(trial, record))
    return {"study": report.name, "model": report.settings.family, "number": trial.number,
            "state": state_name(trial, report.requeued), "val_accuracy": trial.value, **record.to_json()}


def best_params(reports: list[StudyReport]) -> dict[str, Any]:
    """Per study, the best trial's full setting: what `stl10-search train --param ...` needs to repeat it."""
    return {
        r.name: {"model": r.settings.family, "trial": r.best.number, "val_accuracy": r.best.value,
                 "test_accuracy": r.result.test_accuracy if r.result else None,
                 **r.record(r.best).setting_json(r.best)}
        for r in reports if r.best is not None
    }


def report_json(reports: list[StudyReport], header: list[str]) -> dict[str, Any]:
    return {
        "header": header,
        "studies": [{
            "study": r.name, "model": r.settings.family, "title": r.title,
            "settings": r.study.user_attrs.get("settings"),
            "finished": r.counts.finished, "complete": r.counts.complete, "pruned": r.counts.pruned,
            "failed": r.counts.failed, "interrupted": r.counts.interrupted, "waiting": r.counts.waiting,
            "search_seconds": r.search_seconds, "ended": r.study.user_attrs.get("ended"),
            "best_trial": r.best.number if r.best else None, "best_val_accuracy": r.best.value if r.best else None,
            "best_result": r.result.to_json() if r.result else None, "reference": r.reference,
            "reference_trial": r.reference_trial.number if r.reference_trial else None,
            "param_importances": r.importances, "notes": r.notes,
            "trials": [_trial_json(r, t) for t in r.trials],
        } for r in reports],
    }


def _write_csv(path: Path, headers: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(headers)
        writer.writerows([[printable(cell) if isinstance(cell, str) else cell for cell in row] for row in rows])


def trials_csv(path: Path, reports: list[StudyReport]) -> None:
    """One row per trial: its place, state and value, each scalar field of its record, and a column
    "param_<name>" for every sampled or resolved parameter."""
    rows = [(_trial_json(r, t), r.record(t).params_of(t)) for r in reports for t in r.trials]
    names = sorted({name for _, params in rows for name in params})
    headers = ["study", "model", "number", "state", "val_accuracy", *TrialRecord.scalar_fields()]
    _write_csv(path, headers + [f"param_{n}" for n in names],
               [[row[h] for h in headers] + [params.get(n, "") for n in names] for row, params in rows])


def dataset_name(data: dict[str, Any]) -> str:
    """"STL-10", or an image folder's own name: what the report's title says was searched."""
    if data.get("dataset") == "stl10":
        return "STL-10"
    return printable(Path(data.get("data_root") or "image folder").name)


def write_report(storage: optuna.storages.BaseStorage, out: Path, formats: list[str] | tuple[str, ...] = FORMATS,
                 *, prefix: str = "", storage_name: str = "", cache_dir: Path | None = None,
                 log: Callable[[str], None] = print) -> list[Path]:
    """Write the report files into `out`; returns their paths. A UserError when the storage has no study.

    Names that are not UTF-8 (a class folder, the data folder) are shown by `data.printable` in the Markdown,
    HTML and CSV files; the JSON files keep them exactly, as JSON escapes.
    """
    reports = collect(storage, prefix)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{dataset_name(reports[0].settings.data)} hyperparameter search report"
    searched = reports[0].study.user_attrs.get(PROVENANCE_ATTR)
    header = [f"Generated {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}" + (f" from {storage_name}" if storage_name else ""),
              f"Dataset: {reports[0].settings.data.get('dataset')}"
              + (f" ({reports[0].settings.data.get('data_root')})" if reports[0].settings.data.get("data_root") else "")
              + ("; reference columns: the hand-tuned study of SPEC.md" if any(r.reference for r in reports) else ""),
              *(f"Search {line[0].lower()}{line[1:]}" for line in (describe(searched) if searched else []))]
    written = []
    pictures = data_pictures(reports[0], cache_dir, log) if {"md", "html"} & set(formats) else {}
    if "md" in formats:
        (out / "images").mkdir(exist_ok=True)
        for name, png in pictures.items():
            (out / "images" / name).write_bytes(png)
            written.append(out / "images" / name)
        links = {PICTURES[name]: f"images/{name}" for name in pictures}
        written.append(out / "report.md")
        written[-1].write_text(printable(render_markdown(reports, title, header, links)), encoding="utf-8")
    if "html" in formats:
        written.append(out / "report.html")
        page = render_html(reports, title, header, {PICTURES[n]: png for n, png in pictures.items()})
        written[-1].write_text(printable(page), encoding="utf-8")
    if "json" in formats:
        written.append(out / "report.json")
        written[-1].write_text(json.dumps(report_json(reports, header), indent=2))
        written.append(out / "best_params.json")
        written[-1].write_text(json.dumps(best_params(reports), indent=2))
    if "csv" in formats:
        written.append(out / "trials.csv")
        trials_csv(written[-1], reports)
        written.append(out / "summary.csv")
        _write_csv(written[-1], *summary_csv(reports))
    return written


__all__ = ["FORMATS", "parse_formats", "write_report"]

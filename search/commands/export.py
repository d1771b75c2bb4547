"""`stl10-search export` (a bundle per study's retrained best) and `predict` (with a bundle or a stored best)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from search.bundle import FILES, export_bundle, load_best, load_bundle, parse_formats, stored_model
from search.commands.options import models, open_existing
from search.errors import USER_ERRORS, UserError
from search.pipeline import resolve_device
from search.predict import format_confusion, format_prediction, predict, write_predictions
from search.storage import artifact_dir, redact
from search.studies import existing_study_names, load_stored_families, study_name


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _study_names(args: argparse.Namespace, storage: optuna.storages.BaseStorage, url: str) -> list[str]:
    """The studies --model names that exist; a named one that does not is a UserError."""
    load_stored_families(storage)
    names = [study_name(f, args.study_prefix) for f in models(args)]
    existing = set(existing_study_names(storage))
    missing = [n for n in names if n not in existing]
    if missing and args.model.strip() != "all":
        raise UserError(f"no study {', '.join(map(repr, missing))} in storage {redact(url)}; "
                        f"studies there: {', '.join(sorted(existing)) or 'none'}")
    names = [n for n in names if n in existing]
    if not names:
        raise UserError(f"no stl10-search studies in storage {redact(url)}; run `stl10-search search` first")
    return names


def run_export(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format)
    if args.format is None and "onnx" not in formats:
        _log("model.onnx left out: the onnx packages are not installed (pip install 'stl10-search[onnx]')")
    storage, url = open_existing(args)
    artifacts = artifact_dir(url, args.artifacts)
    exported, problems = 0, []
    for name in _study_names(args, storage, url):
        try:
            trained = stored_model(optuna.load_study(study_name=name, storage=storage), artifacts)
            done = export_bundle(trained, Path(args.out) / name, formats)
        except USER_ERRORS as error:
            problems.append(str(error))
            continue
        files = done.config["files"]
        sizes = ", ".join(f"{file} {files[file]['bytes'] / 1e6:.2f} MB" for file in (FILES[f] for f in formats))
        print(f"{name}: bundle {done.folder} ({sizes}; test accuracy {trained.test_accuracy:.2%}) "
              f"in {done.seconds:.1f}s", flush=True)
        exported += 1
    if not exported:
        raise UserError("; ".join(problems))
    for problem in problems:
        _log(f"skipped: {problem}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    if (args.bundle is None) == (args.model is None):
        raise UserError("predict takes --bundle DIR, or --model M (with --storage URL) for the model `best` stored")
    if bool(args.images) == (args.folder is not None):
        raise UserError("predict takes image files, or --folder DIR, not both")
    device = resolve_device(args.device)
    if args.bundle is not None:
        loaded = load_bundle(args.bundle, log=_log)
    else:
        storage, url = open_existing(args)
        names = _study_names(args, storage, url)
        if len(names) != 1:
            raise UserError(f"predict uses one model at a time; got --model {args.model}")
        loaded = load_best(storage, names[0], artifact_dir(url, args.artifacts))
    predictions = predict(loaded, args.folder if args.folder is not None else args.images, top_k=args.top_k,
                          device=device, batch_size=args.batch_size, log=_log)
    if args.out is not None:
        write_predictions(predictions, args.out)
        _log(f"wrote {len(predictions.rows)} predictions to {args.out}")
    else:
        for row in predictions.rows:
            print(format_prediction(row))
    if predictions.confusion_matrix is not None:
        correct = sum(row[i] for i, row in enumerate(predictions.confusion_matrix))
        print(f"accuracy {predictions.accuracy:.2%} ({correct:,} of {len(predictions.rows):,} images right)"
              + (f" ({len(predictions.skipped)} skipped)" if predictions.skipped else ""))
        print("confusion matrix (rows: true class, columns: predicted):")
        print(format_confusion(predictions.classes, predictions.confusion_matrix))
    return 0

"""`stl10-search export` (a bundle per study's retrained best) and `predict` (with a bundle or a stored best)."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.bundle import FILES, load_bundle, parse_formats
from search.commands.options import say, studies_request
from search.errors import UserError
from search.pipeline import resolve_device
from search.predict import format_confusion, format_prediction, predict, write_predictions
from search.services.results import ExportRequest, export, load_best


def run_export(args: argparse.Namespace) -> int:
    formats = parse_formats(args.format) if args.format is not None else None
    exported, problems = export(ExportRequest(**vars(studies_request(args)), out=Path(args.out), formats=formats), say)
    if not exported:
        raise UserError("; ".join(problems))
    for name, done, trained in exported:
        files = done.config["files"]
        sizes = ", ".join(f"{file} {files[file]['bytes'] / 1e6:.2f} MB" for file in files if file in FILES.values())
        print(f"{name}: bundle {done.folder} ({sizes}; test accuracy {trained.test_accuracy:.2%}) "
              f"in {done.seconds:.1f}s", flush=True)
    for problem in problems:
        say(f"skipped: {problem}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    if (args.bundle is None) == (args.model is None):
        raise UserError("predict takes --bundle DIR, or --model M (with --storage URL) for the model `best` stored")
    if bool(args.images) == (args.folder is not None):
        raise UserError("predict takes image files, or --folder DIR, not both")
    device = resolve_device(args.device)
    if args.bundle is not None:
        loaded = load_bundle(args.bundle, log=say)
    else:
        loaded = load_best(studies_request(args))
    predictions = predict(loaded, args.folder if args.folder is not None else args.images, top_k=args.top_k,
                          device=device, batch_size=args.batch_size, log=say)
    if args.out is not None:
        write_predictions(predictions, args.out)
        say(f"wrote {len(predictions.rows)} predictions to {args.out}")
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

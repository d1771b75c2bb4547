"""Wall time of one whole trial per model: this project's `search.pipeline.fit` vs the plain DataLoader path.

    python -m bench.trial_cost                          # all five models, 500 train images, CPU
    python -m bench.trial_cost --device cuda --images 3500 --epochs 20 --plain-frozen-epochs 20

A trial is building the model, then every epoch's training and validation (`search.training.train`),
same epochs, images, params and seed on both paths; loading the dataset is not timed (a study does it
once). For the frozen MobileNetV2 the project's trial starts from an empty feature cache (a fresh cache
folder, the in-memory cache emptied), so computing the cached features is part of its time; the warm
column is the same trial again with those features on disk, as any later trial of a study finds them.
The plain path (see `bench/plain.py`) runs the backbone on every image of every epoch; to stay within
minutes it runs --plain-frozen-epochs of the --frozen-epochs and extrapolates linearly (build time +
measured epochs + mean measured epoch x the rest), which the table says. Set --plain-frozen-epochs
equal to --frozen-epochs to measure it whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from bench.plain import (
    BenchData,
    PlainBatches,
    add_common_arguments,
    build_plain_model,
    clock,
    forget_features,
    image_config,
    load_bench_data,
    parse_models,
    print_table,
    warm_up,
)
from search.family import families, get_family
from search.pipeline import resolve_device
from search.trial import run_trial

FROZEN = "mobilenet_frozen"


def project_trial(args: argparse.Namespace, family: str, params: dict, data: BenchData, cache: Path, device) -> float:
    config = dataclasses.replace(image_config(args, cache), image_size=data.size)
    forget_features()
    started = clock(device)
    run_trial(get_family(family), params, data.parts, config, device, args.seed)
    return clock(device) - started


def plain_trial(args: argparse.Namespace, family: str, params: dict, data: BenchData, epochs: int,
                device) -> tuple[float, int]:
    """Seconds of a plain trial of params["epochs"], from `epochs` measured ones; returns (seconds, measured)."""
    measured = min(epochs, int(params["epochs"]))
    started = clock(device)
    model = build_plain_model(family, params, data.size, args.weights, device, args.seed)
    source = PlainBatches(data.pil, data.size, params, device, args.seed, args.workers)
    history = run_trial(get_family(family), {**params, "epochs": measured}, data.parts, image_config(args, None),
                        device, args.seed, prepared=(model, model, source)).history
    seconds = clock(device) - started
    per_epoch = sum(m.seconds for m in history) / len(history)
    return seconds + per_epoch * (int(params["epochs"]) - measured), measured


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trial_cost", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, images=500, models=",".join(families()))
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every model but the frozen MobileNetV2 (default 2)")
    parser.add_argument("--frozen-epochs", type=int, default=20, help="epochs of the frozen MobileNetV2 (default 20)")
    parser.add_argument("--plain-frozen-epochs", type=int, default=2,
                        help="epochs of the plain frozen trial actually run, the rest extrapolated (default 2)")
    args = parser.parse_args()
    families = parse_models(args.models)
    device = resolve_device(args.device)
    rows, notes = [], []
    loaded: dict[int, BenchData] = {}
    with tempfile.TemporaryDirectory(prefix="bench-images-") as image_cache:
        for family in families:
            size = get_family(family).image_size
            if size not in loaded:
                loaded[size] = load_bench_data(args, size, Path(image_cache), device)
            data = loaded[size]
            epochs = args.frozen_epochs if family == FROZEN else args.epochs
            overrides = {"epochs": epochs, **({"batch_size": args.batch_size} if args.batch_size else {})}
            params = get_family(family).resolve(overrides)
            warm_up(family, params, size, args.weights, device)

            with tempfile.TemporaryDirectory(prefix="bench-features-") as feature_cache:
                project = project_trial(args, family, params, data, Path(feature_cache), device)
                warm = project_trial(args, family, params, data, Path(feature_cache), device) if family == FROZEN else None
            forget_features()
            plain, measured = plain_trial(args, family, params, data, args.plain_frozen_epochs if family == FROZEN else epochs, device)

            plain_text = f"{plain:.1f}" + ("" if measured == epochs else f" (extrapolated from {measured})")
            ratio = f"{plain / project:.1f}x" + (f" ({plain / warm:.0f}x warm)" if warm else "")
            rows.append([family, str(epochs), f"{project:.1f}", f"{warm:.1f}" if warm else "-", plain_text, ratio])
            print(f"  {family}: project {project:.1f}s, warm {warm or 0:.1f}s, plain {plain:.1f}s "
                  f"({measured} of {epochs} epochs measured)", flush=True)
            if measured != epochs:
                notes.append(f"{family}: plain s = build + {measured} measured epochs + their mean x {epochs - measured} "
                             f"more epochs (linear extrapolation; --plain-frozen-epochs {epochs} measures it whole)")

    sizes = ", ".join(f"{s}px: {len(d.parts['train'])} train / {len(d.parts['val'])} val" for s, d in loaded.items())
    print(f"\none trial per model (build + train + validate every epoch), device {device}, "
          f"plain DataLoader num_workers={args.workers} ({sizes})")
    print_table(["model", "epochs", "project s", "project s (warm cache)", "plain s", "ratio (plain/project)"], rows)
    if FROZEN in families:
        notes.insert(0, f"{FROZEN}: project s starts from an empty feature cache and includes computing it "
                        f"(feature_views augmented train views + validation); warm = same trial with features on disk, "
                        f"in-memory cache emptied.")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()

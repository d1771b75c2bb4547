"""Training throughput of one epoch per model: this project's pipeline vs the plain DataLoader path.

    python -m bench.data_pipeline                       # all five models, 1,000 train images, CPU
    python -m bench.data_pipeline --device cuda --images 3500 --models cnn,mobilenet_finetune

For each model, at the study's input size (64 px, 96 px for MobileNetV2), both paths train the same
model from the same seed on the same images with the same batch size for one epoch, through
`search.training.train` with validation left out. Images per second = train images / wall seconds of
that epoch; loading the dataset is not timed. The project path is `search.pipeline.prepare` (uint8
images, normalize and augment on whole batches on the device); for the frozen MobileNetV2 that means
training the head on cached backbone features, so the one-time feature computation that `prepare`
does (every augmented view of the train images, and the validation images) has its own column.
The plain path is described in `bench/plain.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from bench.plain import (
    BenchData,
    PlainBatches,
    TrainOnly,
    add_common_arguments,
    apply_threads,
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
from search.trial import prepare, run_trial, uses_feature_cache


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, images=1000, models=",".join(families()))
    args = parser.parse_args()
    names = parse_models(args.models)
    device = resolve_device(args.device)
    threads = apply_threads(args)
    rows = []
    loaded: dict[int, BenchData] = {}
    with tempfile.TemporaryDirectory(prefix="bench-images-") as image_cache:
        for family in names:
            family_entry = get_family(family)
            size = family_entry.image_size
            if size not in loaded:
                loaded[size] = load_bench_data(args, size, Path(image_cache), device)
            data = loaded[size]
            overrides = {"batch_size": args.batch_size} if args.batch_size else {}
            params = {**family_entry.resolve(overrides), "epochs": 1}
            warm_up(family, params, size, args.weights, device)
            count = len(data.parts["train"])

            with tempfile.TemporaryDirectory(prefix="bench-features-") as feature_cache:
                forget_features()
                config = dataclasses.replace(image_config(args, Path(feature_cache)), image_size=size)
                started = clock(device)
                model, trained, source = prepare(family_entry, params, data.parts, config, device, args.seed)
                prepared = clock(device)
                run_trial(family_entry, params, data.parts, config, device, args.seed,
                          prepared=(model, trained, TrainOnly(source)))
                project_epoch = clock(device) - prepared
                prepare_seconds = prepared - started

            model = build_plain_model(family, params, size, args.weights, device, args.seed,
                                      num_classes=len(data.parts["train"].classes))
            plain = PlainBatches(data.pil, size, params, device, args.seed, args.workers)
            started = clock(device)
            run_trial(family_entry, params, data.parts, config, device, args.seed,
                      prepared=(model, model, TrainOnly(plain)))
            plain_epoch = clock(device) - started

            rows.append([
                family,
                str(params["batch_size"]),
                f"{count / project_epoch:,.0f}",
                f"{prepare_seconds:.1f}" if uses_feature_cache(model) else "-",
                f"{count / plain_epoch:,.0f}",
                f"{plain_epoch / project_epoch:.1f}x",
            ])
            print(f"  {family}: project epoch {project_epoch:.2f}s, plain epoch {plain_epoch:.2f}s", flush=True)

    sizes = ", ".join(f"{s}px: {len(d.parts['train'])} train / {len(d.parts['val'])} val, loaded in {d.load_seconds:.1f}s"
                      for s, d in loaded.items())
    print(f"\none training epoch per model, device {device}, {threads} intra-op thread(s), "
          f"plain DataLoader num_workers={args.workers} ({sizes})")
    print_table(["model", "batch", "project img/s", "one-time features s", "plain img/s", "ratio"], rows)
    print("ratio = project img/s / plain img/s (same model, seed, images, batch size; validation not timed).")
    if "mobilenet_frozen" in names:
        print("mobilenet_frozen: the project trains its head on cached backbone features; the one-time column is "
              "`prepare` computing them (feature_views augmented views of the train images + validation), "
              "which every later epoch and trial reuses. The plain path runs the backbone on every image, every epoch.")


if __name__ == "__main__":
    main()

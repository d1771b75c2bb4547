"""`stl10-search train`: one hand-set run, the way the study worked, with a per-epoch table."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from models import build_model, count_trainable, format_layer_table, get_family
from search.cli import data_config, parse_assignments
from search.errors import UserError
from search.pipeline import Fit, load_parts, place, prepare, resolve_device
from search.spaces import resolve_params
from search.training import Diverged, EpochMetrics, check_training_params, train

HEADER = f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'val loss':>8}  {'val acc':>7}  {'time':>6}"


def format_epoch(m: EpochMetrics) -> str:
    return (f"{m.epoch:>5}  {m.train_loss:>10.4f}  {m.train_accuracy:>9.1%}  {m.val_loss:>8.4f}  "
            f"{m.val_accuracy:>7.1%}  {m.seconds:>5.1f}s")


def run_train(args: argparse.Namespace) -> int:
    family = get_family(args.model).name
    overrides = parse_assignments(args.param)
    ranges = [k for k, v in overrides.items() if isinstance(v, (list, str)) and (isinstance(v, list) or ".." in v)]
    if ranges:
        raise UserError(f"train takes one value per parameter; {', '.join(ranges)} given a range or list "
                        "(ranges are for `stl10-search search`)")
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    params = resolve_params(family, overrides)
    check_training_params(params)
    config = data_config(args)
    # bad architecture values or weights fail before any data is loaded
    build_model(family, params, image_size=args.image_size, weights=config.weights_for(family))
    device = resolve_device(args.device)

    started = time.perf_counter()
    print(f"loading {config.dataset} at {config.size_for(family)}px ...", file=sys.stderr, flush=True)
    parts = place(load_parts(config, family, with_test=args.test), device)
    print(f"train {len(parts['train'])}, validation {len(parts['val'])}"
          + (f", test {len(parts['test'])}" if "test" in parts else "")
          + f" images, {len(parts['train'].classes)} classes ({time.perf_counter() - started:.1f}s); device {device}",
          file=sys.stderr)

    bar = tqdm(total=0, unit="batch", leave=False, disable=None, file=sys.stderr)

    def on_epoch(metrics: EpochMetrics) -> None:
        bar.clear()
        print(format_epoch(metrics), flush=True)
        bar.reset()

    def on_batch() -> None:
        bar.update()

    model, trained, source = prepare(family, params, parts, config, device, args.seed)
    print(format_layer_table(model))
    print(f"{get_family(family).title}: {count_trainable(model):,} trainable parameters")
    print("params: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    bar.total = source.num_batches()
    print(HEADER)
    try:
        history = train(trained, source, params, device, on_epoch=on_epoch, on_batch=on_batch)
    except Diverged as diverged:
        bar.close()
        print(f"stl10-search: {diverged}; try a lower lr (now {params['lr']:g})", file=sys.stderr)
        return 1
    bar.close()
    if args.test:
        result = Fit(model, trained, source, history, params).evaluate("test", device)
        print(f"test: loss {result.loss:.4f}, accuracy {result.accuracy:.2%} ({len(parts['test'])} images)")
    print(f"done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0

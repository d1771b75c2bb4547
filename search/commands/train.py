"""`stl10-search train`: one hand-set run, the way the study worked, with a per-epoch table."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from models import count_trainable, format_layer_table
from search.commands.options import QUIET, data_config, models, parse_assignments, say, verbosity
from search.errors import UserError
from search.family import get_family
from search.pipeline import load_parts, place, resolve_device
from search.trial import run_trial
from search.training import Diverged, EpochMetrics

HEADER = f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'val loss':>8}  {'val acc':>7}  {'time':>6}"


def format_epoch(m: EpochMetrics) -> str:
    return (f"{m.epoch:>5}  {m.train_loss:>10.4f}  {m.train_accuracy:>9.1%}  {m.val_loss:>8.4f}  "
            f"{m.val_accuracy:>7.1%}  {m.seconds:>5.1f}s")


def run_train(args: argparse.Namespace) -> int:
    names = models(args)
    if len(names) != 1:
        raise UserError(f"train runs one model at a time; got --model {args.model}")
    family = get_family(names[0])
    overrides = parse_assignments(args.param)
    ranges = [k for k, v in overrides.items() if isinstance(v, list) or (isinstance(v, str) and ".." in v)]
    if ranges:
        raise UserError(f"train takes one value per parameter; {', '.join(ranges)} given a range or list "
                        "(ranges are for `stl10-search search`)")
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    params = family.resolve(overrides)
    config = data_config(args)
    size = family.size_for(params, config.image_size)
    # bad architecture values or weights fail before any data is loaded
    family.create_model(params, image_size=size, weights=config.weights)
    device = resolve_device(args.device)

    started = time.perf_counter()
    say(f"loading {config.dataset} at {size}px ...")
    parts = place(load_parts(config, size, with_test=args.test), device)
    say(f"train {len(parts['train'])}, validation {len(parts['val'])}"
        + (f", test {len(parts['test'])}" if "test" in parts else "")
        + f" images, {len(parts['train'].classes)} classes ({time.perf_counter() - started:.1f}s); device {device}")

    bar = tqdm(total=0, unit="batch", leave=False, disable=None if verbosity() > QUIET else True, file=sys.stderr)

    def on_start(model, source) -> None:
        print(format_layer_table(model))
        print(f"{family.title}: {count_trainable(model):,} trainable parameters")
        print("params: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
        bar.total = source.num_batches()
        print(HEADER)

    def on_epoch(metrics: EpochMetrics) -> None:
        bar.clear()
        print(format_epoch(metrics), flush=True)
        bar.reset()

    try:
        fit = run_trial(family, params, parts, config, device, args.trial_seed, on_start=on_start, on_epoch=on_epoch,
                        on_batch=bar.update)
    except Diverged as diverged:
        print(f"stl10-search: {diverged}; try a lower lr (now {params['lr']:g})", file=sys.stderr)
        return 1
    finally:
        bar.close()
    if args.test:
        result = fit.evaluate("test", device)
        print(f"test: loss {result.loss:.4f}, accuracy {result.accuracy:.2%} ({len(parts['test'])} images)")
    say(f"done in {time.perf_counter() - started:.1f}s")
    return 0

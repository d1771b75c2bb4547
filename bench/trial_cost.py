"""Wall time of one whole trial per model: this project's `search.trial.run_trial` vs the plain DataLoader path.

    python -m bench.trial_cost                          # all five models, 500 train images, CPU
    python -m bench.trial_cost --device cuda --images 3500 --cudnn-benchmark on,off

A trial is building the model, then every epoch's training and validation, same epochs, images, params
and seed on both paths; loading the dataset is not timed (a study does it once). The project's trial runs
several times in this process, as a worker runs one trial after another:
- cold: the first trial of this model, batch size and image size in the process, so any one-off cost
  (kernel selection, allocator growth, a warm-up pass, the frozen MobileNetV2's feature cache, computed
  into an empty cache folder) is in it;
- warm: the same trial again, as the worker's next trials find things.
"first epoch" and "later epochs (median)" are the per-epoch seconds the runner records (train + validate),
cold / warm: a warm-up paid once per worker shows as a slow cold first epoch and fast warm epochs.
The plain path (see `bench/plain.py`) is timed after an untimed warm-up step, so the ratio compares warm
with warm; it runs the frozen MobileNetV2's backbone on every image of every epoch, and to stay within
minutes runs --plain-frozen-epochs of the --frozen-epochs and extrapolates linearly (build time + measured
epochs + mean measured epoch x the rest), which the table says.
--cudnn-benchmark on,off (CUDA) runs each convolutional model under both settings of
torch.backends.cudnn.benchmark (the family's flag, which `search.trial.prepare` applies), one row each.
Each setting runs in a process of its own (this script again, with one setting): cuDNN v8 looks up its
plan cache before it reads the flag, so in one process "off" would reuse the plans "on" tuned for the same
shapes. The models without convolutions run in the first process only.
The warm and plain trials run --repeats times, interleaved, and the medians are shown: on a machine whose
cores other work also uses, one run of each swings by up to 2x. There, --threads 1 steadies them further
(with torch's default of one thread per core, its threads wait on each other when one is descheduled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.plain import (
    BenchData,
    PlainBatches,
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
from search.family import Family, families, get_family
from search.pipeline import resolve_device
from search.trial import has_convolutions, run_trial

FROZEN = "mobilenet_frozen"


@dataclass(frozen=True)
class Timed:
    """One trial's wall seconds and the runner's seconds per epoch."""

    seconds: float
    epochs: tuple[float, ...]

    @property
    def first(self) -> float:
        return self.epochs[0]

    @property
    def later(self) -> float | None:
        return statistics.median(self.epochs[1:]) if len(self.epochs) > 1 else None


def project_trial(args: argparse.Namespace, family: Family, params: dict, data: BenchData, cache: Path,
                  device: torch.device) -> Timed:
    config = dataclasses.replace(image_config(args, cache), image_size=data.size)
    started = clock(device)
    fit = run_trial(family, params, data.parts, config, device, args.seed)
    return Timed(clock(device) - started, tuple(m.seconds for m in fit.history))


def plain_trial(args: argparse.Namespace, family: Family, params: dict, data: BenchData, epochs: int,
                device: torch.device) -> tuple[float, int]:
    """Seconds of a plain trial of params["epochs"], from `epochs` measured ones; returns (seconds, measured)."""
    measured = min(epochs, int(params["epochs"]))
    started = clock(device)
    model = build_plain_model(family.name, params, data.size, args.weights, device, args.seed,
                              num_classes=len(data.parts["train"].classes))
    source = PlainBatches(data.pil, data.size, params, device, args.seed, args.workers)
    history = run_trial(family, {**params, "epochs": measured}, data.parts, image_config(args, None),
                        device, args.seed, prepared=(model, model, source)).history
    seconds = clock(device) - started
    per_epoch = sum(m.seconds for m in history) / len(history)
    return seconds + per_epoch * (int(params["epochs"]) - measured), measured


def median_trial(runs: list[Timed]) -> Timed:
    """The run of median wall time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def cudnn_settings(text: str | None, device: torch.device) -> list[bool | None]:
    """--cudnn-benchmark "on,off" -> [True, False]; not given -> [None] (each family's own flag)."""
    if not text:
        return [None]
    if device.type != "cuda":
        raise SystemExit("--cudnn-benchmark applies to CUDA devices only")
    values = {"on": True, "off": False}
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if not words or any(w not in values for w in words):
        raise SystemExit(f"--cudnn-benchmark takes on, off or on,off; got {text!r}")
    return [values[w] for w in dict.fromkeys(words)]


def _pair(cold: float | None, warm: float | None) -> str:
    return "-" if cold is None or warm is None else f"{cold:.2f} / {warm:.2f}"


@dataclass
class Measured:
    """The table's rows and notes, as one process measured them (a process per cuDNN setting sends them as JSON)."""

    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, str] = field(default_factory=dict)  # image side -> "Npx: T train / V val"
    threads: int = 0


def is_convolutional(name: str, params: dict) -> bool:
    family = get_family(name)
    return has_convolutions(family.create_model(params, image_size=family.image_size))


def model_params(args: argparse.Namespace, name: str) -> dict:
    epochs = args.frozen_epochs if name == FROZEN else args.epochs
    return get_family(name).resolve({"epochs": epochs, **({"batch_size": args.batch_size} if args.batch_size else {})})


def measure(args: argparse.Namespace, names: list[str], device: torch.device, setting: bool | None) -> Measured:
    """Every model's cold, warm and plain trials, under one cuDNN benchmark setting (None: the family's own)."""
    measured = Measured(threads=apply_threads(args))
    loaded: dict[int, BenchData] = {}
    with tempfile.TemporaryDirectory(prefix="bench-images-") as image_cache:
        for name in names:
            family = get_family(name)
            size = family.image_size
            if size not in loaded:
                loaded[size] = load_bench_data(args, size, Path(image_cache), device)
            data = loaded[size]
            params = model_params(args, name)
            epochs = int(params["epochs"])
            convolutional = is_convolutional(name, params)
            variant = family if setting is None or not convolutional else dataclasses.replace(family,
                                                                                             cudnn_benchmark=setting)
            plain_epochs = args.plain_frozen_epochs if name == FROZEN else epochs
            with tempfile.TemporaryDirectory(prefix="bench-features-") as feature_cache:
                forget_features()
                cold = project_trial(args, variant, params, data, Path(feature_cache), device)
                warm_up(name, params, size, args.weights, device)  # the plain path's, untimed
                warms, plains = [], []
                for _ in range(args.repeats):  # interleaved, so a burst of other work hits both alike
                    warms.append(project_trial(args, variant, params, data, Path(feature_cache), device))
                    plains.append(plain_trial(args, variant, params, data, plain_epochs, device))
            forget_features()
            warm = median_trial(warms)
            plain, plain_measured = statistics.median(p for p, _ in plains), plains[0][1]

            cudnn = ("on" if variant.cudnn_benchmark else "off") if convolutional else "-"
            plain_text = f"{plain:.1f}" + ("" if plain_measured == epochs else f" (extrapolated from {plain_measured})")
            measured.rows.append([name, str(epochs), str(params["batch_size"]),
                                  *([cudnn] if device.type == "cuda" else []), f"{cold.seconds:.1f}",
                                  f"{warm.seconds:.1f}", _pair(cold.first, warm.first), _pair(cold.later, warm.later),
                                  plain_text, f"{plain / warm.seconds:.1f}x ({plain / cold.seconds:.1f}x cold)"])
            print(f"  {name}{f' (cudnn benchmark {cudnn})' if device.type == 'cuda' else ''}: project cold "
                  f"{cold.seconds:.1f}s, warm {warm.seconds:.1f}s, plain {plain:.1f}s "
                  f"({plain_measured} of {epochs} epochs measured)", flush=True)
            if plain_measured != epochs:
                measured.notes.append(f"{name}: plain s = build + {plain_measured} measured epochs + their mean x "
                                      f"{epochs - plain_measured} more epochs (linear extrapolation; "
                                      f"--plain-frozen-epochs {epochs} measures it whole)")
    measured.sizes = {str(s): f"{s}px: {len(d.parts['train'])} train / {len(d.parts['val'])} val"
                      for s, d in loaded.items()}
    return measured


def setting_commands(argv: list[str], words: list[str], convolutional: list[str], rows_dir: Path
                     ) -> list[tuple[str, list[str], Path]]:
    """(setting, command, rows file) per cuDNN setting: this script with that one setting (argparse takes the last
    of a repeated option); every process after the first measures only the convolutional models."""
    commands = []
    for i, word in enumerate(words):
        rows = rows_dir / f"rows-{word}.json"
        models = [] if i == 0 else ["--models", ",".join(convolutional)]
        commands.append((word, [sys.executable, "-m", "bench.trial_cost", *argv, *models, "--cudnn-benchmark", word,
                                "--rows-out", str(rows)], rows))
    return commands


def measure_apart(argv: list[str], args: argparse.Namespace, names: list[str], settings: list[bool]) -> Measured:
    """One process per cuDNN setting (see the module's docstring); their rows merged model by model."""
    words = ["on" if setting else "off" for setting in settings]
    convolutional = [name for name in names if is_convolutional(name, model_params(args, name))]
    parts: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="bench-settings-") as rows_dir:
        for word, command, rows in setting_commands(argv, words, convolutional, Path(rows_dir)):
            print(f"cudnn benchmark {word}, in a process of its own:", flush=True)
            code = subprocess.run(command).returncode
            if code != 0:
                raise SystemExit(f"the process for --cudnn-benchmark {word} exited with {code}")
            parts.append(Measured(**json.loads(rows.read_text())))
    merged = Measured(threads=parts[0].threads)
    for name in names:
        merged.rows += [row for part in parts for row in part.rows if row[0] == name]
    for part in parts:
        merged.notes += [note for note in part.notes if note not in merged.notes]
        merged.sizes.update(part.sizes)
    return merged


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.trial_cost", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, images=500, models=",".join(families()))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every model but the frozen MobileNetV2 (default 3)")
    parser.add_argument("--frozen-epochs", type=int, default=20, help="epochs of the frozen MobileNetV2 (default 20)")
    parser.add_argument("--plain-frozen-epochs", type=int, default=2,
                        help="epochs of the plain frozen trial actually run, the rest extrapolated (default 2)")
    parser.add_argument("--cudnn-benchmark", metavar="on,off",
                        help="CUDA only: run each convolutional model under these torch.backends.cudnn.benchmark "
                             "settings, each in a process of its own (default: the family's own)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="run the warm project trial and the plain trial this many times, interleaved, and "
                             "report the medians (default 3)")
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)  # a process per setting writes its rows here
    args = parser.parse_args(argv)
    names = parse_models(args.models)
    device = resolve_device(args.device)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    settings = cudnn_settings(args.cudnn_benchmark, device)
    if len(settings) > 1:
        measured = measure_apart(argv, args, names, settings)
    else:
        measured = measure(args, names, device, settings[0])
    if args.rows_out:
        args.rows_out.write_text(json.dumps(dataclasses.asdict(measured)))
        return
    print_report(args, names, device, measured)


def print_report(args: argparse.Namespace, names: list[str], device: torch.device, measured: Measured) -> None:
    print(f"\none trial per model (build + train + validate every epoch), device {device}, "
          f"{measured.threads} intra-op thread(s), plain DataLoader num_workers={args.workers} "
          f"({', '.join(measured.sizes.values())})"
          + (f"; warm and plain: median of {args.repeats} runs" if args.repeats > 1 else "")
          + ("; each cuDNN setting in a process of its own" if args.cudnn_benchmark else ""))
    print_table(["model", "epochs", "batch", *(["cudnn benchmark"] if device.type == "cuda" else []),
                 "project cold s", "project warm s", "first epoch s (cold / warm)",
                 "later epoch s, median (cold / warm)", "plain s", "ratio plain / project warm"], measured.rows)
    notes = ["cold = first trial of this model, batch size and image size in the process; warm = the same "
             "trial again; epoch seconds are the runner's own (train + validate)."]
    if FROZEN in names:
        notes.append(f"{FROZEN}: the cold trial starts from an empty feature cache and includes computing it "
                     "(feature_views augmented train views + validation); the warm trial finds them in memory.")
    for note in notes + measured.notes:
        print(note)


if __name__ == "__main__":
    main()

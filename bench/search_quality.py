"""Search quality: per model, the study's hand-found reference setting against the best of an N-trial search,
on the same data and split, each scored once on the test split.

    python -m bench.search_quality                                  # CPU: logreg, mlp, mobilenet_frozen, ~20 min
    python -m bench.search_quality --device cuda --models all       # GPU: all five at the studies' own budgets
    python -m bench.search_quality --models logreg --n-trials 3 --param epochs=2     # a smoke run

Both sides go through the command line a user runs, in one SQLite file under --work-dir:
- reference: `search --n-trials 1 --enqueue-reference --pruner none` (study prefix "reference-"), so the
  one trial is what --enqueue-reference runs: the reference setting, with the --param values that fix a
  parameter applied to it;
- searched: `search --n-trials N` (prefix "searched-"; TPE sampler, Hyperband pruning, seed 0);
then `best` on each. So both follow `best`'s rule: validation accuracy is the trial's best epoch, and the
test accuracy is that of the trial retrained with its params and seed up to that epoch (the same schedule),
scored once on test. Trainable parameters are those of the retrained model.

--param (repeatable, "name=value", "name=low..high", "name=a,b", "model.name=...") goes to both sides, so
both get the same epoch budget and image size; a range or list narrows the search only, the reference keeps
its own value of that parameter when it lies inside, else the sampler draws it.
On the CPU, the default budget (below, printed in the header) is sized for logreg, mlp and mobilenet_frozen
to fit about 20 minutes on 2 cores; --study-budget drops it and runs the studies' own spaces and epochs.
The frozen MobileNetV2's default fixes its augmentation, so its backbone features are computed once for the
whole search (the feature cache is keyed by flip_p and max_rotation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import optuna

from bench.launch import run_cli, tail
from bench.plain import add_data_arguments, parse_models, print_table
from search.best import stored_result
from search.records import BestResult
from search.family import get_family

CPU_MODELS = "logreg,mlp,mobilenet_frozen"
# Per model on the CPU: (trials, --param values), for logreg + mlp + mobilenet_frozen to take about 15-18 minutes
# on 2 shared cores with the 3,500 / 1,500 CIFAR folder. Measured there, per epoch of train + validation: logreg
# about 0.5-1 s; the reference mlp 11-15 s (smaller searched ones 4 s); mobilenet_frozen's head 0.2-0.5 s plus about
# 2 s per trial to build, after about 70 s computing the cached features once (2 views of train, validation, test).
# cnn (about 5 s per epoch) and mobilenet_finetune (minutes per epoch) have a CPU budget too, outside those minutes.
CPU_BUDGET: dict[str, tuple[int, list[str]]] = {
    "logreg": (16, ["epochs=15"]),
    "mlp": (6, ["epochs=5"]),
    "cnn": (8, ["epochs=6"]),
    "mobilenet_frozen": (16, ["epochs=20", "image_size=96", "feature_views=2", "flip_p=0.5", "max_rotation=8"]),
    "mobilenet_finetune": (2, ["epochs=1", "image_size=96"]),
}
REFERENCE, SEARCHED = "reference-", "searched-"


@dataclass
class Side:
    """One side's stored `best` result, or why there is none."""

    result: BestResult | None
    seconds: float
    problem: str | None = None

    def figure(self, key: str) -> str:
        if self.result is None:
            return "-"
        value = getattr(self.result, key)
        return f"{value:.2%}" if isinstance(value, float) else "-"


def model_params(model: str, defaults: list[str], given: list[str]) -> list[str]:
    """The --param values that concern `model`, one per name: its defaults, then the user's (which win);
    unprefixed ones only where the model has that parameter, "model.name=..." only for this model."""
    names = {d.name for d in get_family(model).space}
    chosen: dict[str, str] = {}
    for item in [*defaults, *given]:
        key = item.partition("=")[0].strip()
        target, _, name = key.rpartition(".")
        if target == model or (not target and name in names):
            chosen[key] = item
    return list(chosen.values())


def budget(args: argparse.Namespace, model: str, cpu: bool) -> tuple[int, list[str]]:
    trials, defaults = CPU_BUDGET[model] if cpu and not args.study_budget and model in CPU_BUDGET else (
        get_family(model).n_trials, [])
    return args.n_trials or trials, model_params(model, defaults, args.param or [])


def run_side(args: argparse.Namespace, model: str, prefix: str, trials: int, params: list[str], workdir: Path,
             url: str, cache: Path) -> Side:
    """`search` then `best` for one study; the stored result, or the problem."""
    log_path = workdir / f"{prefix}{model}.log"
    placement = ["--workers", "1"] if args.gpu is None else ["--gpus", str(args.gpu), "--workers-per-gpu", "1"]
    arguments = ["search", "--model", model, "--n-trials", str(trials), "--study-prefix", prefix, "--storage", url,
                 "--dataset", "imagefolder", "--data-root", str(args.data_root), "--cache-dir", str(cache),
                 "--weights", str(args.weights) if args.weights else "none", "--log-dir", str(workdir / "logs" / prefix),
                 *placement]
    if prefix == REFERENCE:
        arguments += ["--enqueue-reference", "--pruner", "none"]
    for item in params:
        arguments += ["--param", item]
    started = time.perf_counter()
    code, _ = run_cli(arguments, log_path, args.timeout)
    if code == 0:
        code, _ = run_cli(["best", "--model", model, "--study-prefix", prefix, "--storage", url, "--device",
                           args.device, "--cache-dir", str(cache)], log_path, args.timeout)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=f"{prefix}{model}", storage=url) if code == 0 else None
    result = stored_result(study) if study is not None else None
    if result is None:
        print(f"  {prefix}{model} failed (exit {code}); last lines of {log_path}:\n{tail(log_path)}", file=sys.stderr,
              flush=True)
        return Side(None, seconds, f"exit {code}, see {log_path}")
    return Side(result, seconds)


def parameters(side: Side) -> str:
    return f"{side.result.trainable_parameters:,}" if side.result else "-"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.search_quality", description=__doc__.split("\n\n")[0],
                                     epilog="CPU default budget: " + "; ".join(
                                         f"{m}: {t} trials, {' '.join(p)}" for m, (t, p) in CPU_BUDGET.items()))
    parser.add_argument("--models", help=f"comma-separated models or all (default {CPU_MODELS} on the CPU, all on CUDA)")
    parser.add_argument("--n-trials", type=int, help="trials of each search (default: the CPU budget, else the study's)")
    parser.add_argument("--param", action="append", metavar="KEY=VALUE",
                        help="a parameter for both the reference and the search (repeatable; see above)")
    parser.add_argument("--study-budget", action="store_true",
                        help="on the CPU too, the studies' own spaces and epochs instead of the CPU budget")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add_data_arguments(parser)
    parser.add_argument("--work-dir", type=Path,
                        help="keep the studies (studies.db, report with `stl10-search report --storage ...`) and logs "
                             "here (default: a temporary folder)")
    parser.add_argument("--cache-dir", type=Path,
                        help="decoded images and backbone features (default: under the work folder, so computing "
                             "them is part of the time)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one command may run (default 3600)")
    args = parser.parse_args()
    kind, _, index = args.device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise SystemExit(f"--device takes cpu, cuda or cuda:N; got {args.device!r}")
    cpu = kind == "cpu"
    args.gpu = None if cpu else int(index or 0)
    args.device = "cpu" if cpu else "cuda:0" if args.gpu == 0 else args.device
    if args.n_trials is not None and args.n_trials < 1:
        raise SystemExit("--n-trials must be at least 1")
    names = parse_models(args.models or (CPU_MODELS if cpu else "all"))
    budgets = {m: budget(args, m, cpu) for m in names}

    rows, failed = [], False
    with ExitStack() as stack:
        workdir = (args.work_dir.resolve() if args.work_dir
                   else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-quality-"))))
        workdir.mkdir(parents=True, exist_ok=True)
        cache = args.cache_dir or workdir / "cache"
        url = f"sqlite:///{workdir / 'studies.db'}"
        print(f"search quality on {args.data_root} (split 0.3, seed 0), device {args.device}, work folder {workdir}",
              flush=True)
        for model in names:
            trials, params = budgets[model]
            print(f"{model}: budget {trials} trials, {' '.join(params) or 'the study space'}", flush=True)
            reference = run_side(args, model, REFERENCE, 1, params, workdir, url, cache)
            searched = run_side(args, model, SEARCHED, trials, params, workdir, url, cache)
            failed |= reference.result is None or searched.result is None
            for label, side in (("reference", reference), ("searched", searched)):
                if side.result is not None:
                    r = side.result
                    print(f"  {label}: val {side.figure('val_accuracy')}, test {side.figure('test_accuracy')}, "
                          f"{parameters(side)} trainable parameters, best epoch {r['epochs']}, trial #{r['trial']}, "
                          f"{side.seconds:.0f}s (search + retrain)", flush=True)
                else:
                    print(f"  {label}: no result ({side.problem})", flush=True)
            rows.append([model, reference.figure("val_accuracy"), reference.figure("test_accuracy"),
                         searched.figure("val_accuracy"), searched.figure("test_accuracy"),
                         f"{parameters(reference)} / {parameters(searched)}"])

    print(f"\ndevice {args.device}; budget per model: "
          + "; ".join(f"{m} {t} trials{', ' + ' '.join(p) if p else ''}" for m, (t, p) in budgets.items()))
    print("val = the trial's best epoch; test = retrained to that epoch (as `best`); trainable params = reference / searched")
    print_table(["model", "reference val", "reference test", "searched val", "searched test", "trainable params"], rows)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

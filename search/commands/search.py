"""`stl10-search search` (create studies, launch workers, summarize) and `stl10-search worker`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from search.commands.options import (data_config, data_given, host_data_overrides, models, parse_assignments,
                                     storage_url)
from search.errors import UserError
from search.family import Family, families, get_family
from search.launcher import (check_worker_count, fit_to_machine, plan_workers, search_failures, start_workers,
                             summary_table, supervise, watch_launcher, worker_log, worker_memory_estimate)
from search.pipeline import data_identity, load_parts, resolve_device
from search.sampling import PRUNERS, SAMPLERS
from search.space import load_space_file
from search.storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, exclusive_worker, open_storage, redact, storage_file
from search.studies import (DATA_ATTR, ENDED_ATTR, StudySettings, create_or_update, data_fields,
                            existing_study_names, load_settings, set_deadlines, study_name)
from search.warmstart import warm_start
from search.worker import work


def space_overrides(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per family: the space file's table, then --param values ("lr=..." for all, "cnn.lr=..." for one)."""
    from_file = load_space_file(args.space, families()) if args.space else {}
    per_family: dict[str, dict[str, Any]] = {f: dict(from_file.get(f, {})) for f in names}
    for key, value in parse_assignments(args.param).items():
        target, _, name = key.rpartition(".")
        if target and target not in names:
            raise UserError(f"--param {key}: {target} is not among the models searched ({', '.join(names)})")
        chosen = [target] if target else [f for f in names if name in {d.name for d in get_family(f).space}]
        if not chosen:
            raise UserError(f"--param {key}: no model among {', '.join(names)} has a parameter {name!r}")
        for family in chosen:
            per_family[family][name] = value
    for family, overrides in per_family.items():
        get_family(family).dims(overrides)  # a bad name, type or empty range fails here, before any storage
    return per_family


def validate_common(args: argparse.Namespace) -> None:
    if args.n_trials is not None and args.n_trials < 1:
        raise UserError(f"--n-trials must be at least 1, got {args.n_trials}")
    for flag, value in (("--heartbeat-interval", args.heartbeat_interval), ("--grace-period", args.grace_period)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 second, got {value}")


def open_from_args(args: argparse.Namespace) -> tuple[optuna.storages.BaseStorage, str]:
    url = storage_url(args)
    storage = open_storage(url, heartbeat_interval=args.heartbeat_interval or HEARTBEAT_INTERVAL_S,
                           grace_period=args.grace_period or GRACE_PERIOD_S)
    return storage, url


def family_file(family: Family) -> str | None:
    """The file a family came from, for workers to load it too; None for built-in and installed families."""
    return family.origin if Path(family.origin).is_file() else None


def prepare_data(settings: StudySettings, cache_dir: Path | None, expect: dict[str, Any] | None) -> dict[str, Any]:
    """Download and decode the data once, and check the family's model on it, before any worker starts.

    The model is built (which fetches its pretrained weights the family's own way, once) and run on one batch
    at every image size the study searches (`Family.check`). Returns the data's identity; a continued study's
    data must still match the one it stored (`expect`).
    """
    config = settings.data_config(cache_dir=cache_dir)
    family = settings.model_family()
    dims = settings.dims()
    params = family.relevant({**{d.name: d.default for d in dims}, **family.reference_trial(dims)})
    sizes = {d.name: d for d in dims}.get("image_size")
    for size in (sizes.choices or (sizes.low,)) if sizes else (family.size_for({}, config.image_size),):
        parts = load_parts(config, int(size), expect=expect)
        family.check({**params, **({"image_size": int(size)} if sizes else {})},
                     num_classes=len(parts["train"].classes), image_size=int(size), weights=config.weights)
    return expect or data_identity(parts["train"], parts["val"])


def ensure_studies(args: argparse.Namespace, names: list[str], spaces: dict[str, dict[str, Any]]
                   ) -> tuple[optuna.storages.BaseStorage, str, list[optuna.Study]]:
    """Create each family's study, or continue it with what the command line changes.

    The data and weights are fetched before anything is written: a storage file that does not exist yet is
    created only once they are known to be there.
    """
    url = storage_url(args)
    path = storage_file(url)
    storage = None if path is not None and not path.exists() else open_from_args(args)[0]
    existing = set(existing_study_names(storage)) if storage is not None else set()
    requested = data_fields(data_config(args)) if data_given(args) else None
    plans = []  # (study name, settings, the data identity a continued study stored)
    for name in names:
        family = get_family(name)
        full_name = study_name(name, args.study_prefix)
        known = None
        if full_name in existing:
            old_study = optuna.load_study(study_name=full_name, storage=storage)
            known = old_study.user_attrs.get(DATA_ATTR)
            old = load_settings(old_study)
            settings = StudySettings(
                family=name,
                n_trials=args.n_trials or old.n_trials,
                sampler=args.sampler or old.sampler,
                pruner=args.pruner or old.pruner,
                seed=old.seed if args.study_seed is None else args.study_seed,
                space=spaces[name] if (args.space or args.param) else old.space,
                data=requested or old.data,
                family_file=family_file(family) or old.family_file,
            )
        else:
            settings = StudySettings(
                family=name,
                n_trials=args.n_trials or (None if getattr(args, "time_budget", None) else family.n_trials),
                sampler=args.sampler or SAMPLERS.default,
                pruner=args.pruner or PRUNERS.default,
                seed=0 if args.study_seed is None else args.study_seed,
                space=spaces[name],
                data=requested or data_fields(data_config(args)),
                family_file=family_file(family),
            )
        plans.append((full_name, settings, known))
    identities = [prepare_data(settings, args.cache_dir, known) for _, settings, known in plans]
    storage = storage or open_from_args(args)[0]
    studies = [create_or_update(storage, n, settings, args.enqueue_reference) for n, settings, _ in plans]
    for study, identity in zip(studies, identities):
        study.set_user_attr(DATA_ATTR, identity)
    if getattr(args, "warm_start", None):
        for study, (_, settings, _) in zip(studies, plans):
            warm_start(study, settings.dims(), settings.family, args.warm_start, args.warm_start_k, _log)
    return storage, url, studies


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_budget(args: argparse.Namespace, names: list[str], device_type: str) -> tuple[float | None, list[float]]:
    """(seconds for the whole search or None, each model's share weight): --time-budget, else for `run` without
    any budget flag the families' own budgets on this device type."""
    weights = [get_family(name).time_budget.get(device_type, 600.0) for name in names]
    if args.time_budget is not None:
        return args.time_budget, weights
    if args.command == "run" and args.n_trials is None:
        return sum(weights), weights
    return None, weights


def start_clock(args: argparse.Namespace, names: list[str], studies: list[optuna.Study], device_type: str) -> None:
    """Store each study's deadline (or none) from now, and forget why its last search ended."""
    seconds, weights = time_budget(args, names, device_type)
    set_deadlines(studies, seconds, weights, time.time())
    for study in studies:
        study.set_user_attr(ENDED_ATTR, None)
    if seconds is None:
        return
    total = sum(weights)
    shares = ", ".join(f"{name} {seconds * w / total / 60:.1f} min" for name, w in zip(names, weights))
    why = "--time-budget" if args.time_budget is not None else (
        f"no --n-trials or --time-budget: each model's default time on the {device_type.upper()}")
    _log(f"time budget {seconds / 60:.1f} min in all ({why}): {shares}; a model that finishes early leaves its "
         "time to the next")


def images_bytes(studies: list[optuna.Study]) -> int:
    """The most bytes of uint8 train images a worker holds for one study: images x 3 x side^2 at its largest size."""
    largest = 0
    for study in studies:
        settings, identity = load_settings(study), study.user_attrs.get(DATA_ATTR) or {}
        family = settings.model_family()
        sizes = {d.name: d for d in settings.dims()}.get("image_size")
        side = max(sizes.choices or (sizes.high,)) if sizes else family.size_for({}, settings.data.get("image_size"))
        largest = max(largest, sum(identity.get("images_per_class", [])) * 3 * int(side) ** 2)
    return largest


def worker_arguments(args: argparse.Namespace) -> list[str]:
    """What every launched worker needs besides the storage URL (passed in its environment)."""
    extra = ["--study-prefix", args.study_prefix]
    for path in args.family_file or []:
        extra += ["--family-file", str(Path(path).resolve())]
    for flag, value in (("--cache-dir", args.cache_dir), ("--checkpoint-dir", args.checkpoint_dir),
                        ("--heartbeat-interval", args.heartbeat_interval), ("--grace-period", args.grace_period)):
        if value is not None:
            extra += [flag, str(value)]
    extra += [part for spec in args.track or [] for part in ("--track", str(spec))]
    return extra


def run_search(args: argparse.Namespace) -> int:
    names = models(args)
    validate_common(args)
    spaces = space_overrides(args, names)
    slots = plan_workers(args.gpus, args.workers_per_gpu, args.workers)
    check_worker_count(storage_url(args), len(slots))
    storage, url, studies = ensure_studies(args, names, spaces)
    print(f"storage {redact(url)}: studies {', '.join(s.study_name for s in studies)}", file=sys.stderr)
    on_gpu = any(s.visible_gpu for s in slots) if slots else torch.cuda.is_available()
    start_clock(args, names, studies, "cuda" if on_gpu else "cpu")
    if not slots:
        print(f"studies created; start workers with: stl10-search worker --model {','.join(names)} --storage URL",
              file=sys.stderr)
        return 0
    slots, warning = fit_to_machine(slots, worker_memory_estimate(), images_bytes(studies), args.oversubscribe)
    if warning:
        _log(warning)
    devices = ", ".join(sorted({f"GPU {s.visible_gpu}" if s.visible_gpu else "CPU" for s in slots}))
    log_dir = Path(args.log_dir)
    print(f"starting {len(slots)} worker(s) on {devices}; logs in {log_dir}/", file=sys.stderr)
    processes = start_workers(slots, names, url, worker_arguments(args), log_dir)
    interrupts = supervise(processes, studies, storage)
    print(summary_table(studies, storage))
    if interrupts:
        return 130
    problems = search_failures(processes, [worker_log(log_dir, i) for i in range(len(processes))], studies)
    for problem in problems:
        _log(f"stl10-search: {problem}")
    return 1 if problems else 0


def run_worker(args: argparse.Namespace) -> int:
    names = models(args)
    validate_common(args)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    storage, url = open_from_args(args)
    study_names = [study_name(f, args.study_prefix) for f in names]
    missing = [n for n in study_names if n not in existing_study_names(storage)]
    if missing and not (args.n_trials and data_given(args)):
        raise UserError(f"no study {', '.join(missing)} in {redact(url)}; create it once with `stl10-search search "
                        "--workers 0 ...`, or give this worker --n-trials and the data options to create it")
    if missing or args.n_trials or args.param or args.space:
        ensure_studies(args, names, space_overrides(args, names))
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stamped(f"worker: {signal.Signals(signum).name} received; stopping after the current epoch")
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    watch_launcher(stop)  # a launcher killed outright stops its workers too, their trials queued again
    with exclusive_worker(storage, study_names):  # a journal takes one worker at a time
        done = work(storage, study_names, device, stop, data_overrides=host_data_overrides(args),
                    checkpoint_dir=args.checkpoint_dir, log=stamped)
    stamped("worker finished: " + ", ".join(f"{name} {count} trial(s)" for name, count in done.items()))
    return 0


def stamped(message: str) -> None:
    """A worker's log line, with the time: its log file gathers the runs of every search that used it."""
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", flush=True)

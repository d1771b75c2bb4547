"""Create (or continue) the studies of a search, start workers on them and watch them: `search` and `worker`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from search.environment import DEFAULT_STORAGE
from search.errors import UserError
from search.family import Family, families, get_family, load_family_file
from search.launcher import (check_worker_count, fit_to_machine, plan_workers, search_failures, start_workers,
                             summary_records, summary_table, supervise, worker_log,
                             worker_memory_estimate)
from search.pipeline import DataConfig, data_identity, load_parts, resolve_device
from search.sampling import PRUNERS, SAMPLERS
from search.space import load_space_file
from search.storage import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, exclusive_worker, open_storage, redact, storage_file
from search.studies import (DATA_ATTR, ENDED_ATTR, StudySettings, create_or_update, data_fields, existing_study_names,
                            load_settings, set_deadlines, study_name)
from search.trackers import TrackerSpec, open_trackers
from search.warmstart import warm_start
from search.worker import work

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


@dataclass
class SearchRequest:
    """A search: which studies (models, budgets, space, sampler, data) and which workers run them.

    `data` None keeps a continued study's data settings (a new study gets DataConfig's defaults); `space` None
    keeps a continued study's space. `time_budget` is the wall time of the whole search in seconds;
    `default_time_budget` gives each model its own default time on the device instead (what `run` does without
    any budget). `workers` 0 creates the studies only.
    """

    models: list[str]
    storage: str = DEFAULT_STORAGE
    study_prefix: str = ""
    n_trials: int | None = None
    time_budget: float | None = None
    default_time_budget: bool = False
    space: dict[str, dict[str, Any]] | None = None
    sampler: str | None = None
    pruner: str | None = None
    study_seed: int | None = None
    data: DataConfig | None = None
    cache_dir: Path | None = None
    family_files: list[Path] = field(default_factory=list)
    enqueue_reference: bool = False
    warm_start: str | None = None
    warm_start_k: int = 5
    checkpoint_dir: Path | None = None
    pack: int | None = None  # trials per pack; None: where it pays (search.pack.pack_size)
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    gpus: str | None = None
    workers_per_gpu: int = 1
    workers: int | None = None
    oversubscribe: bool = False
    log_dir: Path = Path("logs")
    track: list[TrackerSpec] = field(default_factory=list)  # experiment trackers each worker reports to
    progress: bool = True  # show live progress on stderr while the workers run

    def __post_init__(self) -> None:
        for path in self.family_files:
            load_family_file(path)
        self.models = [get_family(name).name for name in self.models]  # an unknown name is a UserError
        if self.n_trials is not None and self.n_trials < 1:
            raise UserError(f"--n-trials must be at least 1, got {self.n_trials}")
        if self.pack is not None and self.pack < 1:
            raise UserError(f"--pack must be at least 1, got {self.pack}")
        for flag, value in (("--heartbeat-interval", self.heartbeat_interval), ("--grace-period", self.grace_period)):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be at least 1 second, got {value}")
        if self.sampler is not None:
            SAMPLERS.check(self.sampler)
        if self.pruner is not None:
            PRUNERS.check(self.pruner)
        if self.space is not None:
            for name, overrides in self.space.items():
                get_family(name).dims(overrides)  # a bad name, type or empty range fails here, before any storage

    def study_names(self) -> list[str]:
        return [study_name(name, self.study_prefix) for name in self.models]

    def open_storage(self) -> optuna.storages.BaseStorage:
        return open_storage(self.storage, heartbeat_interval=self.heartbeat_interval or HEARTBEAT_INTERVAL_S,
                            grace_period=self.grace_period or GRACE_PERIOD_S)


@dataclass
class SearchOutcome:
    """What a search left: its studies, the summary table, and whether it did its work."""

    storage: optuna.storages.BaseStorage
    studies: list[optuna.Study]
    summary: str = ""
    problems: list[str] = field(default_factory=list)  # one line each: failed workers, studies with no result
    interrupted: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)  # the summary as values (search.launcher)

    def summary_json(self) -> list[dict[str, Any]]:
        return self.records or summary_records(self.studies)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.problems else 0)


def space_overrides(models: list[str], space_file: Path | None, assignments: dict[str, Any]
                    ) -> dict[str, dict[str, Any]]:
    """Per family: the space file's table, then --param values ("lr=..." for all, "cnn.lr=..." for one)."""
    from_file = load_space_file(space_file, families()) if space_file else {}
    per_family: dict[str, dict[str, Any]] = {f: dict(from_file.get(f, {})) for f in models}
    for key, value in assignments.items():
        target, _, name = key.rpartition(".")
        if target and target not in models:
            raise UserError(f"--param {key}: {target} is not among the models searched ({', '.join(models)})")
        chosen = [target] if target else [f for f in models if name in {d.name for d in get_family(f).space}]
        if not chosen:
            raise UserError(f"--param {key}: no model among {', '.join(models)} has a parameter {name!r}")
        for family in chosen:
            per_family[family][name] = value
    return per_family


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


def create_studies(request: SearchRequest, log: Log = _stderr) -> tuple[optuna.storages.BaseStorage, list[optuna.Study]]:
    """Create each model's study, or continue it with what the request changes; no deadline is set here.

    The data and weights are fetched, and each model checked, before anything is written: a storage file that
    does not exist yet is created only once they are known to be there.
    """
    path = storage_file(request.storage)
    storage = None if path is not None and not path.exists() else request.open_storage()
    existing = set(existing_study_names(storage)) if storage is not None else set()
    requested = data_fields(request.data) if request.data is not None else None
    space = request.space or {}
    plans = []  # (study name, settings, the data identity a continued study stored)
    for name, full_name in zip(request.models, request.study_names()):
        family = get_family(name)
        known = None
        if full_name in existing:
            old_study = optuna.load_study(study_name=full_name, storage=storage)
            known = old_study.user_attrs.get(DATA_ATTR)
            old = load_settings(old_study)
            settings = StudySettings(
                family=name,
                n_trials=request.n_trials or old.n_trials,
                sampler=request.sampler or old.sampler,
                pruner=request.pruner or old.pruner,
                seed=old.seed if request.study_seed is None else request.study_seed,
                space=space.get(name, {}) if request.space is not None else old.space,
                data=requested or old.data,
                family_file=family_file(family) or old.family_file,
            )
        else:
            timed = request.time_budget is not None or request.default_time_budget
            settings = StudySettings(
                family=name,
                n_trials=request.n_trials or (None if timed else family.n_trials),
                sampler=request.sampler or SAMPLERS.default,
                pruner=request.pruner or PRUNERS.default,
                seed=0 if request.study_seed is None else request.study_seed,
                space=space.get(name, {}),
                data=requested or data_fields(DataConfig()),
                family_file=family_file(family),
            )
        plans.append((full_name, settings, known))
    identities = [prepare_data(settings, request.cache_dir, known) for _, settings, known in plans]
    storage = storage or request.open_storage()
    studies = [create_or_update(storage, n, settings, request.enqueue_reference) for n, settings, _ in plans]
    for study, identity in zip(studies, identities):
        study.set_user_attr(DATA_ATTR, identity)
    if request.warm_start:
        for study, (_, settings, _) in zip(studies, plans):
            warm_start(study, settings.dims(), settings.family, request.warm_start, request.warm_start_k, log)
    return storage, studies


def time_budget(request: SearchRequest, device_type: str) -> tuple[float | None, list[float]]:
    """(seconds for the whole search or None, each model's share weight): the request's time budget, else with
    `default_time_budget` the families' own budgets on this device type."""
    weights = [get_family(name).time_budget.get(device_type, 600.0) for name in request.models]
    if request.time_budget is not None:
        return request.time_budget, weights
    if request.default_time_budget:
        return sum(weights), weights
    return None, weights


def start_clock(request: SearchRequest, studies: list[optuna.Study], device_type: str, log: Log = _stderr) -> None:
    """Store each study's deadline (or none) from now, and forget why its last search ended."""
    seconds, weights = time_budget(request, device_type)
    set_deadlines(studies, seconds, weights, time.time())
    for study in studies:
        study.set_user_attr(ENDED_ATTR, None)
    if seconds is None:
        return
    total = sum(weights)
    shares = ", ".join(f"{name} {seconds * w / total / 60:.1f} min" for name, w in zip(request.models, weights))
    why = "--time-budget" if request.time_budget is not None else (
        f"no --n-trials or --time-budget: each model's default time on the {device_type.upper()}")
    log(f"time budget {seconds / 60:.1f} min in all ({why}): {shares}; a model that finishes early leaves its "
        "time to the next")


def describe_packs(pack: int | None, studies: list[optuna.Study], device_type: str) -> str:
    """How many trials each study's workers train as one stacked model (`--pack`), in one line."""
    import torch

    from search.pack import pack_size

    sizes = []
    for study in studies:
        family = load_settings(study).model_family()
        if pack == 1 or not family.pack_members:
            size = "1"
        elif pack is not None:
            size = f"up to {pack}"
        elif device_type == "cuda":
            size = "as many as half the free GPU memory holds (at most 16)"
        else:
            size = str(pack_size(family, torch.device("cpu")))
        sizes.append(f"{family.name} {size}")
    how = "--pack" if pack is not None else "--pack auto, the default"
    return f"trial packs ({how}; trials of one shape trained as one stacked model): {', '.join(sizes)}"


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


def worker_arguments(request: SearchRequest) -> list[str]:
    """What every launched worker needs besides the storage URL (passed in its environment)."""
    extra = ["--study-prefix", request.study_prefix]
    for path in request.family_files:
        extra += ["--family-file", str(Path(path).resolve())]
    for flag, value in (("--cache-dir", request.cache_dir), ("--checkpoint-dir", request.checkpoint_dir),
                        ("--heartbeat-interval", request.heartbeat_interval), ("--grace-period", request.grace_period)):
        if value is not None:
            extra += [flag, str(value)]
    extra += ["--pack", "auto" if request.pack is None else str(request.pack)]
    extra += [part for spec in request.track for part in ("--track", str(spec))]
    return extra


def search(request: SearchRequest, log: Log = _stderr) -> SearchOutcome:
    """Create (or continue) the studies, set their clock, start the workers and watch them until they end.

    With `workers` 0 only the studies are created; start workers elsewhere (`stl10-search worker`).
    """
    slots = plan_workers(request.gpus, request.workers_per_gpu, request.workers)  # bad --gpus fails before storage
    check_worker_count(request.storage, len(slots))
    storage, studies = create_studies(request, log)
    log(f"storage {redact(request.storage)}: studies {', '.join(s.study_name for s in studies)}")
    on_gpu = any(s.visible_gpu for s in slots) if slots else _cuda_available()
    start_clock(request, studies, "cuda" if on_gpu else "cpu", log)
    if slots:
        log(describe_packs(request.pack, studies, "cuda" if on_gpu else "cpu"))
    if not slots:
        log(f"studies created; start workers with: stl10-search worker --model {','.join(request.models)} "
            "--storage URL")
        return SearchOutcome(storage, studies)
    return run_workers(request, storage, studies, slots, log)


def run_workers(request: SearchRequest, storage: optuna.storages.BaseStorage, studies: list[optuna.Study],
                slots: list | None = None, log: Log = _stderr) -> SearchOutcome:
    """Start worker processes on existing studies, show progress until they end, and summarize."""
    slots = slots if slots is not None else plan_workers(request.gpus, request.workers_per_gpu, request.workers)
    slots, warning = fit_to_machine(slots, worker_memory_estimate(), images_bytes(studies), request.oversubscribe)
    if warning:
        log(warning)
    devices = ", ".join(sorted({f"GPU {s.visible_gpu}" if s.visible_gpu else "CPU" for s in slots}))
    log(f"starting {len(slots)} worker(s) on {devices}; logs in {request.log_dir}/")
    processes = start_workers(slots, request.models, request.storage, worker_arguments(request), request.log_dir)
    interrupts = supervise(processes, studies, storage, progress=request.progress)
    records = summary_records(studies)
    outcome = SearchOutcome(storage, studies, summary_table(records), interrupted=bool(interrupts), records=records)
    if not interrupts:
        logs = [worker_log(request.log_dir, i) for i in range(len(processes))]
        outcome.problems = search_failures(processes, logs, studies)
    return outcome


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class WorkerRequest:
    """One worker process: the studies to work, on which device, with which of this host's paths overriding what
    the studies stored. `changes`: the search request changes the studies (a budget, a space), so they are
    updated (or created, with data settings and a budget) before the worker starts."""

    search: SearchRequest
    device: str = "auto"
    threads: int | None = None
    host_data: dict[str, Any] = field(default_factory=dict)  # cache_dir, data_root, weights of this host
    changes: bool = False

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")


def run_worker(request: WorkerRequest, stop: threading.Event, log: Log) -> dict[str, int]:
    """Pull trials of the request's studies until their budgets are met or `stop` is set; returns the trials this
    worker finished per study. A missing study is created when the request says how (a budget and data
    settings), else a UserError."""
    if request.threads is not None:
        import torch

        torch.set_num_threads(request.threads)
    device = resolve_device(request.device)
    storage = request.search.open_storage()
    names = request.search.study_names()
    missing = [n for n in names if n not in existing_study_names(storage)]
    if missing and not (request.search.n_trials and request.search.data is not None):
        raise UserError(f"no study {', '.join(missing)} in {redact(request.search.storage)}; create it once with "
                        "`stl10-search search --workers 0 ...`, or give this worker --n-trials and the data options "
                        "to create it")
    if missing or request.changes:
        create_studies(request.search, log)
    trackers = open_trackers(request.search.track, log)
    try:
        with exclusive_worker(storage, names):  # a journal takes one worker at a time
            return work(storage, names, device, stop, data_overrides=request.host_data,
                        checkpoint_dir=request.search.checkpoint_dir, log=log, trackers=trackers,
                        pack=request.search.pack)
    finally:
        trackers.close()

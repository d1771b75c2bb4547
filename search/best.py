"""Retrain-and-test: the best trial of a study trained again with its params and seed, scored once on test.

This is the step the reference study did by hand: choose on validation, then touch the test split once.
The retrained run stops at the trial's best epoch, so it is the model the validation chose. The result is
stored on the study (a `search.records.BestResult`) and the weights as an Optuna artifact, so `best` run again
prints what is stored instead of training again.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import optuna
import torch
from optuna.trial import FrozenTrial

from models import count_trainable
from search.artifacts import WeightsStore, save_weights
from search.errors import UserError
from search.pipeline import load_parts, place
from search.storage import artifact_dir  # noqa: F401 - re-exported: it moved to storage.py
from search.provenance import provenance
from search.records import BestResult, TrialRecord
from search.studies import DATA_ATTR, load_settings, trial_seed
from search.training import autocast, confusion_matrix
from search.trial import has_convolutions, run_trial


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The study's best trial (the rule of `search.studies.best_trial`); a UserError when none has completed.

    Optuna's `study.best_trial`: a storage opened by `open_storage` reads that one trial (`search.rdb_reads`), so
    `best` costs the same in a study of 10 trials or 10,000.
    """
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"study {study.study_name!r} has no completed trial yet; run `stl10-search search` first"
                        ) from None


def stored_result(study: optuna.Study, trial: FrozenTrial | None = None, full_train: bool | None = None
                  ) -> BestResult | None:
    """The stored result, if it is for `trial` and the same full_train choice (when given)."""
    result = BestResult.load(study)
    if result is None:
        return None
    if trial is not None and result.trial != trial.number:
        return None
    if full_train is not None and result.full_train != full_train:
        return None
    return result


LATENCY_BATCHES = (1, 256)
LATENCY_MIN_SECONDS = 0.5  # per batch size and attempt: torch.utils.benchmark runs blocks of calls this long
LATENCY_MAX_SPREAD = 0.25  # an interquartile range over this share of the median is measured again
LATENCY_ATTEMPTS = 3


def measure_latency(model: torch.nn.Module, image_size: int, device: torch.device) -> dict[str, Any]:
    """Inference milliseconds per image at batch 1 and 256 on `device`, as the model will be served: eval mode,
    channels-last for convolutions, the training precision on CUDA; warm-up calls untimed.

    Each figure is the median over blocks of calls (`torch.utils.benchmark.Timer.blocked_autorange`, which also
    synchronizes CUDA), kept with its interquartile range and the thread count: one timed loop on a busy machine
    made a CNN look 100x slower at batch 1 than at 256. A spread over LATENCY_MAX_SPREAD of the median is
    measured again, up to LATENCY_ATTEMPTS times, and the steadiest measurement is kept.

    Returns the result's fields: {"latency_ms": {"batch_1": ms, "batch_256": ms}, "latency_iqr_ms": {...},
    "latency_threads": n}.
    """
    import logging

    # torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on every machine where a
    # CUDA build of torch runs without a GPU (pip's default build on a laptop): a line that says nothing to a user
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    model.eval()
    layout = torch.channels_last if has_convolutions(model) else torch.contiguous_format
    threads = torch.get_num_threads()
    medians, spreads = {}, {}
    for batch in LATENCY_BATCHES:
        x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)

        def infer() -> None:
            with torch.inference_mode(), autocast(device):
                model(x)

        infer()  # kernel selection and caches, untimed
        timer = Timer("infer()", globals={"infer": infer}, num_threads=threads)
        measurements = []
        for _ in range(LATENCY_ATTEMPTS):
            measurements.append(timer.blocked_autorange(min_run_time=LATENCY_MIN_SECONDS))
            if measurements[-1].iqr <= LATENCY_MAX_SPREAD * measurements[-1].median:
                break
        steadiest = min(measurements, key=lambda m: m.iqr / m.median)
        medians[f"batch_{batch}"] = steadiest.median / batch * 1000
        spreads[f"batch_{batch}"] = steadiest.iqr / batch * 1000
    return {"latency_ms": medians, "latency_iqr_ms": spreads, "latency_threads": threads}


@contextlib.contextmanager
def same_threads(threads: int | None, device: torch.device) -> Iterator[None]:
    """On the CPU, retrain with the trial's number of threads: summation order depends on it, and a CNN's
    validation accuracy drifted by 1.7 points over 3 epochs between 1 and 2 threads. Then the retrain
    reproduces the trial exactly."""
    before = torch.get_num_threads()
    if device.type != "cpu" or not threads:
        yield
        return
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_class_accuracy(matrix: list[list[int]]) -> list[float | None]:
    return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(matrix)]


def retrain_and_test(
    study: optuna.Study,
    store: WeightsStore,
    device: torch.device,
    *,
    full_train: bool = False,
    data_overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> BestResult:
    """Train the best trial again up to its best epoch, score it on test, store result and weights on the study."""
    trial = best_trial(study)
    record = TrialRecord.load(trial)
    settings = load_settings(study)
    family = settings.model_family()
    params = record.params_of(trial)
    best_epoch = int(record.best_epoch or params["epochs"])
    seed = trial_seed(settings, record, trial.number)
    config = settings.data_config(**(data_overrides or {}))

    started = time.perf_counter()
    if 0 < len(record.history) < int(params["epochs"]):
        log(f"[{study.study_name}] trial #{trial.number} was stopped by the time budget after epoch "
            f"{len(record.history)} of {params['epochs']}: it is retrained on the same schedule up to its best epoch, "
            f"{best_epoch}")
    if record.pack_id is not None:
        log(f"[{study.study_name}] trial #{trial.number} trained in pack #{record.pack_id} of {record.pack_size}: it is "
            f"retrained alone, with its seed {seed} and the pack's batches (data seed {record.data_seed})")
    log(f"[{study.study_name}] retraining trial #{trial.number} for {best_epoch} epoch(s) on "
        f"{'train+validation' if full_train else 'train'} ({device})")
    size = family.size_for(params, config.image_size)
    parts = place(load_parts(config, size, with_test=True, full_train=full_train,
                             expect=study.user_attrs.get(DATA_ATTR)), device)
    with same_threads(record.threads, device):
        trained = run_trial(family, params, parts, config, device, seed, stop_after=best_epoch,
                            on_epoch=lambda m: log(f"[{study.study_name}] epoch {m.epoch}/{best_epoch}: train loss "
                                                   f"{m.train_loss:.4f}, val accuracy {m.val_accuracy:.2%} "
                                                   f"({m.seconds:.1f}s)"),
                            data_seed=record.data_seed)
    test = trained.evaluate("test", device)
    seconds = time.perf_counter() - started

    classes = list(parts["test"].classes)
    matrix = confusion_matrix(parts["test"].labels, test.predictions, len(classes))
    result = BestResult(
        trial=trial.number,
        val_accuracy=trial.value,
        # the same params and seeds on the CPU reproduce a solo trial: this equals val_accuracy unless full_train;
        # a pack member's is within a point of it (tests/test_packs_in_search.py)
        retrained_val_accuracy=trained.history[-1].val_accuracy if trained.history else None,
        test_loss=test.loss,
        test_accuracy=test.accuracy,
        test_images=len(parts["test"]),
        per_class_accuracy=per_class_accuracy(matrix),
        confusion_matrix=matrix,
        classes=classes,
        trainable_parameters=count_trainable(trained.model),
        params=params,
        epochs=best_epoch,
        seed=seed,
        data_seed=record.data_seed,
        seconds=seconds,
        full_train=full_train,
        device=str(device),
        provenance=provenance().as_dict(),
        **measure_latency(trained.model, size, device),
        **save_weights(study, trial.number, trained.model, store),
    )
    result.save(study)
    return result


def format_result(name: str, result: BestResult) -> str:
    """The one line `best` prints per model; tests and the report read the same numbers."""
    latency = result.latency_ms
    return (f"{name}: test accuracy {result.test_accuracy:.2%}, test loss {result.test_loss:.4f} "
            f"(trial #{result.trial}, validation {result.val_accuracy:.2%}, "
            f"{result.trainable_parameters:,} parameters"
            + (f", {latency['batch_1']:.2f} ms/image at batch 1 and {latency['batch_256']:.3f} at batch 256 on "
               f"{result.device}" if latency else "")
            + f"{', full train' if result.full_train else ''})")

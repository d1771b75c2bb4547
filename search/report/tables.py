"""The report's tables as plain rows of text, so Markdown and HTML show the same cells."""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial, TrialState

from search.records import BestResult
from search.report.collect import StudyReport, trial_reason, trial_seconds
from search.studies import state_name

Table = tuple[list[str], list[list[str]]]  # headers, rows


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def count_text(value: int | str | None) -> str:
    """A parameter count with thousands separators; words ("head only") as they are."""
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(value_text, value)) + ")"
    return str(value)


def summary_table(reports: list[StudyReport]) -> Table:
    """Per model: the search's figures, and the hand-tuned study's next to them when the data is STL-10."""
    with_reference = any(r.reference for r in reports)
    with_hand_found = any(r.reference_trial for r in reports)
    headers = ["model", "study", "best val acc", "test acc", "test loss", "trainable params",
               "finished", "pruned", "failed", "interrupted", "queued", "search time"]
    if with_hand_found:
        headers += ["hand-found setting val acc"]
    if with_reference:
        headers += ["reference val acc", "reference test acc", "reference test loss", "reference params"]
    rows = []
    for r in reports:
        row = [r.title, r.name, percent(r.best.value if r.best else None),
               percent(r.result.test_accuracy if r.result else None),
               number(r.result.test_loss if r.result else None), count_text(r.parameters),
               f"{r.counts.finished}/{r.settings.n_trials}" if r.settings.n_trials else str(r.counts.finished),
               str(r.counts.pruned), str(r.counts.failed), str(r.counts.interrupted), str(r.counts.waiting),
               duration(r.search_seconds)]
        if with_hand_found:
            row += [_trial_outcome(r, r.reference_trial)]
        if with_reference:
            ref = r.reference or {}
            row += [percent(ref.get("val_accuracy")), percent(ref.get("test_accuracy")),
                    number(ref.get("test_loss"), 3), count_text(ref.get("parameters"))]
        rows.append(row)
    return headers, rows


def _trial_outcome(report: StudyReport, trial: FrozenTrial | None) -> str:
    """The validation accuracy of a completed trial, else its state ("pruned", "interrupted", "waiting", ...)."""
    if trial is None:
        return "-"
    return percent(trial.value) if trial.state == TrialState.COMPLETE else state_name(trial, report.requeued)


def _setting(report: StudyReport, trial: FrozenTrial) -> dict[str, Any]:
    """The trial's parameters; for a trial still waiting in the queue, those it was enqueued with."""
    return report.record(trial).params_of(trial) or dict(trial.system_attrs.get("fixed_params") or {})


def reference_table(report: StudyReport) -> Table:
    """The hand-found setting's trial (queued by --enqueue-reference) beside the searched best, figures then params.

    The last column marks the parameters the search changed. No rows when the study ran no hand-found setting.
    """
    headers = ["", "hand-found setting", "searched best", ""]
    reference, best = report.reference_trial, report.best
    if reference is None:
        return headers, []

    def test_accuracy(trial: FrozenTrial | None) -> str:
        tested = trial is not None and report.result and report.result.trial == trial.number
        return percent(report.result.test_accuracy) if tested else "-"

    def size(trial: FrozenTrial | None) -> str:
        return "-" if trial is None else count_text(report.record(trial).trainable_parameters)

    reason = trial_reason(reference, report.record(reference))
    rows = [["trial", f"#{reference.number}", f"#{best.number}" if best else "-", ""],
            ["state", state_name(reference, report.requeued), "complete" if best else "-", ""],
            ["val acc", _trial_outcome(report, reference), percent(best.value) if best else "-", ""],
            ["test acc", test_accuracy(reference), test_accuracy(best), ""],
            ["trainable params", size(reference), size(best), ""]]
    if reason and reference.state != TrialState.COMPLETE:
        rows.append(["why it ended", reason, "", ""])
    ours, theirs = _setting(report, reference), report.record(best).params_of(best) if best else {}
    for name in sorted(set(ours) | set(theirs)):
        mine, found = ours.get(name), theirs.get(name)
        rows.append([name, "-" if mine is None else value_text(mine), "-" if found is None else value_text(found),
                     "changed" if best and best is not reference and mine != found else ""])
    return headers, rows


def best_params_table(report: StudyReport) -> Table:
    if report.best is None:
        return ["parameter", "value", ""], []
    record = report.record(report.best)
    searched = set(report.best.params)
    rows = [[name, value_text(value), "searched" if name in searched else "fixed"]
            for name, value in sorted(record.params_of(report.best).items())]
    rows.append(["best epoch", str(record.best_epoch or "-"), "chosen on validation"])
    return ["parameter", "value", ""], rows


def curves_table(report: StudyReport) -> Table:
    rows = [[str(m.epoch), number(m.train_loss), percent(m.train_accuracy), number(m.val_loss),
             percent(m.val_accuracy), f"{m.seconds:.1f} s"] for m in report.history]
    return ["epoch", "train loss", "train acc", "val loss", "val acc", "time"], rows


def importance_table(report: StudyReport) -> Table:
    return ["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in (report.importances or {}).items()]


def test_result_text(result: BestResult) -> str:
    """The retrained model's test figures in a sentence, with its latency (median, and interquartile range when
    measured) when `best` measured it."""
    text = (f"Test accuracy {result.test_accuracy:.2%}, test loss {result.test_loss:.4f} "
            f"on {result.test_images} images.")
    parts = [f"{result.latency_ms[k]:.3g} ms" + (f" (IQR {result.latency_iqr_ms[k]:.2g})" if k in result.latency_iqr_ms
                                                 else "") + f" at batch {k.removeprefix('batch_')}"
             for k in ("batch_1", "batch_256") if result.latency_ms.get(k) is not None]
    if parts:
        threads = f", {result.latency_threads} thread(s)" if result.latency_threads else ""
        text += f" Inference time per image, median: {', '.join(parts)} on {result.device}{threads}."
    return text


def per_class_table(report: StudyReport) -> Table:
    if not report.result:
        return ["class", "test acc"], []
    result = report.result
    return ["class", "test acc"], [[c, percent(a)] for c, a in zip(result.classes, result.per_class_accuracy)]


def trials_table(report: StudyReport) -> Table:
    """Every trial with its state and why it ended, so diverged, pruned and failed runs stay visible."""
    rows = []
    requeued = report.requeued
    for t in report.trials:
        searched = ", ".join(f"{k}={value_text(v)}" for k, v in sorted(t.params.items()))
        record = report.record(t)
        number = f"{t.number} (hand-found)" if record.reference else str(t.number)
        rows.append([number, state_name(t, requeued), percent(t.value) if t.value is not None else "-",
                     str(record.best_epoch or "-"), duration(trial_seconds(t, record)), trial_reason(t, record) or "-",
                     searched])
    return ["#", "state", "val acc", "best epoch", "time", "why it ended", "parameters"], rows

"""The report's tables as plain rows of text, so Markdown and HTML show the same cells."""

from __future__ import annotations

from pathlib import Path
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


class Link(str):
    """A table cell that links somewhere: Markdown and HTML show its text as a link to `href`."""

    href: str

    def __new__(cls, text: str, href: str) -> Link:
        cell = super().__new__(cls, text)
        cell.href = href
        return cell


# The summary's columns: (CSV name, shown heading, how a value is shown). summary.csv holds the values as numbers
# (fractions, counts, seconds); Markdown and HTML show them formatted.
_SUMMARY: list[tuple[str, str, Any]] = [
    ("model", "model", str), ("study", "study", str), ("best_val_accuracy", "best val acc", percent),
    ("test_accuracy", "test acc", percent), ("test_loss", "test loss", number), ("parameters", "trainable params",
                                                                                  lambda v: count_text(v)),
    ("finished", "finished", str), ("trial_budget", "budget", lambda v: "-" if v is None else str(v)),
    ("pruned", "pruned", str), ("failed", "failed", str), ("interrupted", "interrupted", str), ("queued", "queued", str),
    ("search_seconds", "search time", duration),
]
_HAND_FOUND = [("hand_found_val_accuracy", "hand-found setting val acc",
                lambda v: percent(v) if isinstance(v, float) else v or "-")]  # its accuracy, or its state
_REFERENCE = [("reference_val_accuracy", "reference val acc", percent),
              ("reference_test_accuracy", "reference test acc", percent),
              ("reference_test_loss", "reference test loss", lambda v: number(v, 3)),
              ("reference_parameters", "reference params", lambda v: count_text(v))]
_BUNDLE = [("bundle", "bundle", lambda v: "-" if v is None else Link("bundle", Path(v).as_uri()))]


def summary_rows(reports: list[StudyReport]) -> tuple[list[tuple[str, str, Any]], list[list[Any]]]:
    """Per model the search's figures as values, the hand-tuned study's beside them when the data is STL-10, and
    the exported bundle when there is one: (columns, rows)."""
    columns = list(_SUMMARY)
    columns += _HAND_FOUND if any(r.reference_trial for r in reports) else []
    columns += _REFERENCE if any(r.reference for r in reports) else []
    columns += _BUNDLE if any(r.result and r.result.bundle for r in reports) else []
    rows = []
    for r in reports:
        ref = r.reference or {}
        values = {"model": r.title, "study": r.name, "best_val_accuracy": r.best.value if r.best else None,
                  "test_accuracy": r.result.test_accuracy if r.result else None,
                  "test_loss": r.result.test_loss if r.result else None, "parameters": r.parameters,
                  "finished": r.counts.finished, "trial_budget": r.settings.n_trials, "pruned": r.counts.pruned,
                  "failed": r.counts.failed, "interrupted": r.counts.interrupted, "queued": r.counts.waiting,
                  "search_seconds": r.search_seconds, "hand_found_val_accuracy": _outcome(r, r.reference_trial),
                  "reference_val_accuracy": ref.get("val_accuracy"), "reference_test_accuracy": ref.get("test_accuracy"),
                  "reference_test_loss": ref.get("test_loss"), "reference_parameters": ref.get("parameters"),
                  "bundle": r.result.bundle if r.result else None}
        rows.append([values[name] for name, _, _ in columns])
    return columns, rows


def summary_table(reports: list[StudyReport]) -> Table:
    """The summary as shown: percentages, thousands separators, durations, a link to each bundle."""
    columns, rows = summary_rows(reports)
    return [heading for _, heading, _ in columns], [[show(v) for (_, _, show), v in zip(columns, row)] for row in rows]


def summary_csv(reports: list[StudyReport]) -> tuple[list[str], list[list[Any]]]:
    """The summary as numbers: fractions, counts, seconds; what a spreadsheet or pandas reads."""
    columns, rows = summary_rows(reports)
    return [name for name, _, _ in columns], rows


def _outcome(report: StudyReport, trial: FrozenTrial | None) -> float | str | None:
    """The validation accuracy of a completed trial, else its state ("pruned", "interrupted", "waiting", ...)."""
    if trial is None:
        return None
    return trial.value if trial.state == TrialState.COMPLETE else state_name(trial, report.requeued)


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
            ["val acc", _HAND_FOUND[0][2](_outcome(report, reference)), percent(best.value) if best else "-", ""],
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
    """Each trial with its state and why it ended, so diverged, pruned and failed runs stay visible, and the trial
    pack it trained in (its time is the pack's); a large study lists `report.table_trials` (its notes say which)."""
    rows = []
    requeued = report.requeued
    for t in report.table_trials:
        searched = ", ".join(f"{k}={value_text(v)}" for k, v in sorted(t.params.items()))
        record = report.record(t)
        number = f"{t.number} (hand-found)" if record.reference else str(t.number)
        rows.append([number, state_name(t, requeued), percent(t.value) if t.value is not None else "-",
                     str(record.best_epoch or "-"), duration(trial_seconds(t, record)), trial_reason(t, record) or "-",
                     f"#{record.pack_id} of {record.pack_size}" if record.pack_id is not None else "-", searched])
    return ["#", "state", "val acc", "best epoch", "time", "why it ended", "pack", "parameters"], rows

"""report.md: the tables, with the data pictures linked as PNG files beside it.

Text that comes from the user's world (class and folder names, family titles, failure reasons) is escaped as
in report.html: Markdown passes HTML through, so a class named <img src=x onerror=...> would run in a viewer.
"""

from __future__ import annotations

import html

from search.report.collect import StudyReport
from search.report.tables import (Link, Table, best_params_table, curves_table, importance_table, per_class_table,
                                  reference_table, summary_table, test_result_text, trials_table)
from search.report.tradeoff import smallest_line, tradeoff_table


def _text(text: object) -> str:
    """Text shown as it is: '<', '>' and '&' as HTML entities, which every Markdown renderer shows as the characters."""
    return html.escape(str(text), quote=False)


def _cell(text: object) -> str:
    cell = _text(text).replace("|", "\\|").replace("\n", " ")
    return f"[{cell}]({text.href})" if isinstance(text, Link) else cell


def markdown_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(reports: list[StudyReport], title: str, header: list[str], pictures: dict[str, str]) -> str:
    """`pictures`: caption -> PNG path relative to report.md."""
    parts = [f"# {_text(title)}", "", *map(_text, header), "",
             "Interactive plots (optimization history, importances, parallel coordinates) are in report.html.", "",
             "## Accuracy, size and latency across models", "",
             "Each model's best: test accuracy when retrained and tested, else validation accuracy. report.html "
             "plots every finished trial's validation accuracy against its trainable parameters (pruned ones hollow), "
             "the Pareto front, and the tested bests against their latency.", "",
             markdown_table(tradeoff_table(reports)), "", _text(smallest_line(reports)), "",
             "## Summary", "", markdown_table(summary_table(reports)), ""]
    if pictures:
        parts += ["## Data", ""]
        for caption, path in pictures.items():
            parts += [f"{caption}:", "", f"![{caption}]({path})", ""]
    for r in reports:
        parts += [f"## {_text(r.title)} (study `{r.name}`)", ""]
        parts += [f"- {_text(note)}" for note in r.notes] + ([""] if r.notes else [])
        if r.best is not None:
            parts += [f"### Best parameters (trial #{r.best.number}, validation {r.best.value:.2%})", "",
                      markdown_table(best_params_table(r)), ""]
        if r.reference_trial is not None:
            parts += ["### Hand-found setting against the searched best", "", markdown_table(reference_table(r)), ""]
        if r.history:
            parts += ["### Learning curves of the best trial", "", markdown_table(curves_table(r)), ""]
        if r.importances:
            parts += ["### Parameter importances", "", markdown_table(importance_table(r)), ""]
        if r.result:
            parts += [f"### Test result (trial #{r.result.trial} retrained"
                      f"{' on train+validation' if r.result.full_train else ''})", "",
                      _text(test_result_text(r.result)), "", markdown_table(per_class_table(r)), ""]
        parts += ["### Trials", "", markdown_table(trials_table(r)), ""]
    return "\n".join(parts)

"""report.html: one self-contained page that opens offline: plotly inlined once, pictures as data URIs.

A small script first in the page records any script error or console.error into the attribute
`data-errors` of <html>, so a headless browser's DOM dump shows whether the page ran cleanly.
"""

from __future__ import annotations

import base64
import html

import plotly.graph_objects as go
import plotly.offline

from search.report.collect import StudyReport
from search.report.figures import study_figures
from search.report.tables import (Link, Table, best_params_table, curves_table, per_class_table, reference_table,
                                  summary_table, test_result_text, trials_table)
from search.report.tradeoff import CAPTION, smallest_line, tradeoff_figure, tradeoff_table

_ERROR_RECORDER = """<script>
(function () {
  var errors = [];
  function record(text) {
    errors.push(String(text));
    document.documentElement.setAttribute("data-errors", JSON.stringify(errors));
  }
  document.documentElement.setAttribute("data-errors", "[]");
  window.addEventListener("error", function (e) { record(e.message || e); });
  window.addEventListener("unhandledrejection", function (e) { record(e.reason); });
  var consoleError = console.error;
  console.error = function () { record(Array.prototype.join.call(arguments, " ")); consoleError.apply(console, arguments); };
})();
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; display: block; max-width: 100%;
        overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; max-width: 40em; }
.note { color: #7a4b00; }
.plot { margin: 1em 0; }
.tradeoff { display: grid; grid-template-columns: minmax(0, 1fr) 420px; gap: 1em; align-items: start; }
@media (max-width: 1150px) { .tradeoff { grid-template-columns: minmax(0, 1fr); } }
.tradeoff > .plot { margin: 0; }
.caption { font-size: 0.9em; color: #555; }
section { border-top: 2px solid #ddd; margin-top: 2em; }
</style>"""


def html_table(table: Table, text_columns: tuple[str, ...] = ()) -> str:
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=text' if h in text_columns else ''}>{_cell(c)}</td>"
                         for h, c in zip(headers, row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    text = html.escape(str(value))
    return f'<a href="{html.escape(value.href)}">{text}</a>' if isinstance(value, Link) else text


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class _Plots:
    """Numbers the plot divs; plotly.js itself is inlined once in <head>."""

    def __init__(self) -> None:
        self.count = 0

    def div(self, figure: go.Figure) -> str:
        self.count += 1
        inner = figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{self.count}",
                               config={"displaylogo": False})
        return f'<div class="plot" data-plot="{self.count}">{inner}</div>'


def _tradeoff_section(reports: list[StudyReport], plots: _Plots) -> list[str]:
    """The cross-model figure with its table beside it; the page's first plot.

    A grid, not a flex row: plotly sizes the figure while the page is parsed, before the table exists, so the
    figure's column must have its final width without the table.
    """
    figure = tradeoff_figure(reports)
    section = ["<h2>Accuracy, size and latency across models</h2>"]
    if figure is None:
        return section + ["<p class=note>No model has a completed trial with a parameter count yet.</p>"]
    return section + ['<div class="tradeoff">', plots.div(figure),
                      f"<div>{html_table(tradeoff_table(reports))}<p>{html.escape(smallest_line(reports))}</p></div>",
                      "</div>", f"<p class=caption>{html.escape(CAPTION)}</p>"]


def render_html(reports: list[StudyReport], title: str, header: list[str], pictures: dict[str, bytes]) -> str:
    """`pictures`: caption -> PNG bytes, embedded in the page."""
    plots = _Plots()
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(line)}</p>" for line in header),
            *_tradeoff_section(reports, plots), "<h2>Summary</h2>", html_table(summary_table(reports))]
    if pictures:
        body.append("<h2>Data</h2>")
        for caption, png in pictures.items():
            body.append(f"<figure><img src=\"{png_data_uri(png)}\" alt=\"{html.escape(caption)}\">"
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for r in reports:
        body.append(f"<section id=\"{html.escape(r.name)}\"><h2>{html.escape(r.title)} (study {html.escape(r.name)})</h2>")
        body += [f"<p class=note>{html.escape(note)}</p>" for note in r.notes]
        if r.best is not None:
            body += [f"<h3>Best parameters (trial #{r.best.number}, validation {r.best.value:.2%})</h3>",
                     html_table(best_params_table(r))]
        if r.reference_trial is not None:
            body += ["<h3>Hand-found setting against the searched best</h3>", html_table(reference_table(r))]
        if r.result:
            body += [f"<h3>Test result (trial #{r.result.trial} retrained"
                     f"{' on train+validation' if r.result.full_train else ''})</h3>",
                     f"<p>{html.escape(test_result_text(r.result))}</p>", html_table(per_class_table(r))]
        for name, figure in study_figures(r).items():
            body += [f"<h3>{html.escape(name.capitalize())}</h3>", plots.div(figure)]
        if r.history:
            body += ["<details><summary>Learning curves as a table</summary>", html_table(curves_table(r)), "</details>"]
        body += ["<h3>Trials</h3>", html_table(trials_table(r), text_columns=("why it ended", "parameters")), "</section>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>\n"
            f"{_ERROR_RECORDER}\n{_STYLE}\n<script>{plotly.offline.get_plotlyjs()}</script>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")

"""Accuracy against size and latency across every model: the figure and table that open the report.

Left panel: every finished trial (validation accuracy; pruned ones hollow) against its trainable parameters, the retrained bests
(test accuracy) highlighted, and the Pareto front of the trials as a step line. Right panel: the retrained
bests against their inference latency per image at batch 256; trials are not timed at inference, so only the
bests are there. The dashboard saves the same figure on every study (`search.dashboard.save_tradeoff_plots`), with
the panels stacked to fit its half-width card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import plotly.colors
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.subplots import make_subplots

from search.report.collect import StudyReport
from search.report.figures import accuracy_axis
from search.report.tables import Table, count_text, percent

MARGIN = 0.01  # "within 1 point of the best": one percentage point of accuracy
TITLE = "Accuracy against trainable parameters and latency, every model"
CAPTION = ("Left: every finished trial of every model is a point at its validation accuracy: a filled point ran "
           "its whole epoch budget, a hollow one was pruned early (its best accuracy before it stopped, an "
           "underestimate, so it stays off the front); a star is a study's best trial retrained and scored on "
           "test; the line is the Pareto front of the completed trials (no other is as small and more accurate). "
           "Right: the retrained bests against their inference time per image at batch 256 (trials are not "
           "timed at inference), with their own front. Both axes of size and time are logarithmic.")
_PALETTE = plotly.colors.qualitative.Plotly


@dataclass(frozen=True)
class Point:
    """One model on the accuracy-size plane: a completed trial, or a study's best (tested or not)."""

    study: str
    title: str
    trial: int
    size: int  # trainable parameters
    accuracy: float
    tested: bool = False  # test accuracy of the retrained trial; else the trial's validation accuracy
    latency_ms: float | None = None  # per image at batch 256, of the retrained model
    latency_1_ms: float | None = None  # per image at batch 1
    device: str | None = None  # where the latency was measured

    @property
    def measure(self) -> str:
        return "test" if self.tested else "validation"


def _size(point: Point) -> float:
    return point.size


def _latency(point: Point) -> float:
    return point.latency_ms


def pareto_front(points: Sequence[Point], cost: Callable[[Point], float] = _size) -> list[Point]:
    """The points that no other beats (as cheap or cheaper, and more accurate), from the cheapest up.

    `cost` is what is minimised: the trainable parameters by default, or a latency. Of equal points the
    first one given is kept.
    """
    front: list[Point] = []
    for point in sorted(points, key=lambda p: (cost(p), -p.accuracy)):
        if not front or point.accuracy > front[-1].accuracy:
            front.append(point)
    return front


def smallest_within(points: Sequence[Point], margin: float = MARGIN) -> Point | None:
    """The point with the fewest parameters among those at most `margin` below the best accuracy."""
    if not points:
        return None
    floor = max(p.accuracy for p in points) - margin - 1e-9  # 1e-9: 0.62 - 0.01 is 0.6099999... in floats
    return min((p for p in points if p.accuracy >= floor), key=lambda p: (p.size, -p.accuracy))


def trial_points(reports: list[StudyReport], state: TrialState = TrialState.COMPLETE) -> list[Point]:
    """Every trial in `state` that recorded its trainable parameters and a validation accuracy: a completed
    trial's value, a pruned one's best epoch before it stopped."""
    points = []
    for report in reports:
        for trial in report.trials:
            size = report.record(trial).trainable_parameters
            accuracy = trial.value if trial.value is not None else max(trial.intermediate_values.values(), default=None)
            if trial.state == state and accuracy is not None and isinstance(size, int) and size > 0:
                points.append(Point(report.name, report.title, trial.number, size, float(accuracy)))
    return points


def best_point(report: StudyReport, tested: bool = True) -> Point | None:
    """The study's best trial: retrained and tested when `tested` and a result is stored, else at validation."""
    if report.best is None:
        return None
    if tested and report.result:
        result = report.result
        return Point(report.name, report.title, report.best.number, int(result.trainable_parameters),
                     float(result.test_accuracy), tested=True, latency_ms=result.latency_ms.get("batch_256"),
                     latency_1_ms=result.latency_ms.get("batch_1"), device=result.device)
    size = report.parameters
    if not isinstance(size, int) or size <= 0:
        return None
    return Point(report.name, report.title, report.best.number, size, float(report.best.value))


def best_points(reports: list[StudyReport], tested: bool = True) -> list[Point]:
    return [p for p in (best_point(r, tested) for r in reports) if p is not None]


def tradeoff_table(reports: list[StudyReport]) -> Table:
    """Per model its best: test accuracy when tested, else validation; parameters and latency per image."""
    headers = ["model", "trial", "accuracy", "trainable params", "ms/image, batch 1 / 256"]
    rows = [[p.title, f"#{p.trial}", f"{percent(p.accuracy)} {'test' if p.tested else 'val'}", count_text(p.size),
             f"{_ms(p.latency_1_ms)} / {_ms(p.latency_ms)}" if p.latency_ms or p.latency_1_ms else "-"]
            for p in best_points(reports)]
    return headers, rows


def smallest_line(reports: list[StudyReport], margin: float = MARGIN) -> str:
    """Which model is smallest within `margin` of the best, compared on test accuracy when every model is tested.

    When some best is not tested yet, every model is compared on validation accuracy instead, so that no
    model's test score is set against another's validation score.
    """
    bests = best_points(reports)
    all_tested = bool(bests) and all(p.tested for p in bests)
    points = bests if all_tested else best_points(reports, tested=False)
    chosen = smallest_within(points, margin)
    if chosen is None:
        return "No model has a completed trial with a parameter count yet."
    best = max(points, key=lambda p: p.accuracy)
    measure = "test accuracy" if all_tested else "validation accuracy (not every model is tested yet)"
    text = (f"Smallest model within {margin * 100:g} point of the best, on {measure}: {chosen.title}, "
            f"trial #{chosen.trial} ({count_text(chosen.size)} trainable parameters, {percent(chosen.accuracy)})")
    if chosen is best:
        return text + "; it is also the most accurate."
    return text + (f"; the most accurate is {best.title}, trial #{best.trial} "
                   f"({count_text(best.size)}, {percent(best.accuracy)}).")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _hover(point: Point) -> str:
    lines = [f"<b>{point.title}</b>", f"trial #{point.trial}" + (" retrained" if point.tested else ""),
             f"{point.size:,} trainable parameters", f"{point.measure} accuracy {point.accuracy:.2%}"]
    if point.latency_ms is not None:
        lines.append(f"{point.latency_ms:.3g} ms/image at batch 256"
                     + (f", {point.latency_1_ms:.3g} at batch 1" if point.latency_1_ms is not None else "")
                     + (f" ({point.device})" if point.device else ""))
    return "<br>".join(lines)


def _scatter(points: list[Point], x: Callable[[Point], float], **style) -> go.Scatter:
    return go.Scatter(x=[x(p) for p in points], y=[p.accuracy for p in points], text=[_hover(p) for p in points],
                      hovertemplate="%{text}<extra></extra>", **style)


def _front(points: list[Point], cost: Callable[[Point], float], showlegend: bool) -> go.Scatter:
    front = pareto_front(points, cost)
    return go.Scatter(x=[cost(p) for p in front], y=[p.accuracy for p in front], mode="lines", name="Pareto front",
                      line={"shape": "hv", "color": "#333", "dash": "dot", "width": 1.5}, legendgroup="pareto front",
                      showlegend=showlegend, hoverinfo="skip")


def tradeoff_figure(reports: list[StudyReport], stacked: bool = False) -> go.Figure | None:
    """The two-panel figure, one colour per model; None when no model has a completed trial with a size.

    Side by side (sharing the accuracy axis) for the report's full width; `stacked`, one above the other in the
    450 px of optuna-dashboard's half-width card, where side by side their titles run into each other.
    """
    trials = trial_points(reports)
    pruned = trial_points(reports, TrialState.PRUNED)
    bests = [p for p in best_points(reports) if p.tested]
    if not trials and not bests and not pruned:
        return None
    timed = [p for p in bests if p.latency_ms]
    if stacked:
        figure = make_subplots(rows=2, cols=1, vertical_spacing=0.2, subplot_titles=(
            "against trainable parameters", "against ms per image, batch 256"))
        latency_panel = {"row": 2, "col": 1}
    else:
        figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06, subplot_titles=(
            "against trainable parameters", "against latency (retrained bests only)"))
        latency_panel = {"row": 1, "col": 2}

    for index, report in enumerate(reports):
        colour = _PALETTE[index % len(_PALETTE)]
        own = [p for p in trials if p.study == report.name]
        own_pruned = [p for p in pruned if p.study == report.name]
        best = [p for p in bests if p.study == report.name]
        best_timed = [p for p in timed if p.study == report.name]
        style = {"legendgroup": report.name, "name": report.title}
        if own:
            figure.add_trace(_scatter(own, _size, mode="markers", showlegend=True, **style,
                                      marker={"color": colour, "size": 8, "opacity": 0.6}), row=1, col=1)
        if own_pruned:
            hollow = {"color": colour, "size": 7, "symbol": "circle-open", "opacity": 0.6}
            figure.add_trace(_scatter(own_pruned, _size, mode="markers", showlegend=not own, **style, marker=hollow),
                             row=1, col=1)
        star = {"color": colour, "size": 16, "symbol": "star", "line": {"color": "black", "width": 1}}
        if best:
            figure.add_trace(_scatter(best, _size, mode="markers", showlegend=not (own or own_pruned), **style,
                                      marker=star), row=1, col=1)
        if best_timed:
            figure.add_trace(_scatter(best_timed, _latency, mode="markers", showlegend=False, **style, marker=star),
                             **latency_panel)
    figure.add_trace(_front(trials, _size, showlegend=True), row=1, col=1)
    if timed:
        figure.add_trace(_front(timed, _latency, showlegend=not trials), **latency_panel)
    else:
        figure.add_annotation(text="no latency stored yet:<br>stl10-search best --force measures it", showarrow=False,
                              xref="x2 domain", yref="y2 domain", x=0.5, y=0.5)
    accuracy = accuracy_axis([p.accuracy for p in trials + pruned + bests])
    figure.update_xaxes(type="log")
    if stacked:  # the panels' titles name their x axes
        figure.update_yaxes(title_text="accuracy", **accuracy)
        figure.update_layout(title={"text": "Accuracy against size and latency", "font": {"size": 15},
                                    "subtitle": {"text": "points: validation; stars: test"},
                                    # below the mode bar, which the dashboard shows over the top 30 px
                                    "yref": "container", "y": 1, "yanchor": "top", "pad": {"t": 35}},
                             height=450, margin={"l": 60, "r": 15, "t": 105, "b": 10},
                             legend={"orientation": "h", "y": -0.12, "yanchor": "top", "font": {"size": 11},
                                     "tracegroupgap": 0})
        return figure
    figure.update_xaxes(title_text="trainable parameters", row=1, col=1)
    figure.update_xaxes(title_text="ms per image, batch 256", row=1, col=2)
    figure.update_yaxes(title_text="accuracy (points: validation; stars: test)", **accuracy, row=1, col=1)
    figure.update_layout(title=TITLE, height=480, legend={"orientation": "h", "y": -0.2})
    return figure

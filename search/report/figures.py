"""Plotly figures of a study: the best trial's curves, Optuna's own plots, and the test confusion matrix.

The HTML report and the dashboard draw the same figures, so both come from here. Every accuracy axis is in percent
(`accuracy_axis`), as the report's tables are.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import optuna
import plotly.graph_objects as go
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from data import printable
from search.records import BestResult
from search.report.collect import StudyReport
from search.studies import OBJECTIVE_NAME
from search.training import EpochMetrics

ACCURACY_TICKS = ".1~%"  # plotly's d3 format: 60%, 62.5%; a decimal only where the ticks need one
PARALLEL_PARAMS = 8  # beyond this many axes, the parallel-coordinate plot's labels run into each other


def accuracy_axis(values: Iterable[float | None]) -> dict[str, Any]:
    """Settings for an axis of accuracies (fractions): ticks in percent, and a range from the 5-point step under the
    lowest value to the one over the highest, with at least 2 points to spare so that markers at either end show
    whole; 0 to 100% without values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"tickformat": ACCURACY_TICKS, "range": [0.0, 1.0]}
    low = max(0.0, math.floor(round((min(finite) - 0.02) * 20, 9)) / 20)  # round: 0.65 * 20 is 13.000000000000002
    high = min(1.0, math.ceil(round((max(finite) + 0.02) * 20, 9)) / 20)
    return {"tickformat": ACCURACY_TICKS, "range": [low, high]}


def learning_curves(history: list[EpochMetrics], title: str) -> go.Figure:
    """Train and validation loss (left) and accuracy (right) per epoch, as the reference plotted them."""
    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.1)
    epochs = [m.epoch for m in history]
    for column, metric in ((1, "loss"), (2, "accuracy")):
        for part, dash in (("train", "solid"), ("val", "dash")):
            values = [getattr(m, f"{part}_{metric}") for m in history]
            figure.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers",
                                        name=f"{'validation' if part == 'val' else part} {metric}",
                                        line={"dash": dash}), row=1, col=column)
        figure.update_xaxes(title_text="epoch", dtick=1 if len(epochs) <= 20 else None, row=1, col=column)
    figure.update_yaxes(title_text="loss", row=1, col=1)
    accuracies = [a for m in history for a in (m.train_accuracy, m.val_accuracy)]
    figure.update_yaxes(title_text="accuracy", **accuracy_axis(accuracies), row=1, col=2)
    figure.update_layout(title=title, height=380)
    return figure


def confusion_figure(result: BestResult, title: str) -> go.Figure:
    """Test confusion matrix of the retrained model: rows true class, columns predicted."""
    classes = [printable(name) for name in result.classes]
    figure = go.Figure(go.Heatmap(z=result.confusion_matrix, x=classes, y=classes, colorscale="Blues",
                                  texttemplate="%{z}", hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    figure.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed",
                         height=max(360, 40 * len(classes) + 160))
    return figure


def parallel_params(report: StudyReport, limit: int = PARALLEL_PARAMS) -> list[str]:
    """The parameters the parallel-coordinate plot shows, at most `limit`: the most important first, by Optuna's
    importance; then, when importances are unavailable (too few trials) or name fewer, those that spread widest
    over their searched range. A parameter that took one value in every completed trial is left out."""
    complete = [t for t in report.trials if t.state == TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    spread = {name: _spread(complete, name) for name in sorted({n for t in complete for n in t.params})}
    important = [name for name in report.importances or {} if spread.get(name, 0.0) > 0]
    varied = sorted((name for name in spread if spread[name] > 0 and name not in important), key=lambda n: -spread[n])
    return (important + varied)[:limit]


def _spread(trials: list[FrozenTrial], name: str) -> float:
    """The share of its searched range a parameter covered across `trials`, 0 (one value) to 1 (both ends), on a
    log scale where it was sampled on one; of a choice, the share of the other choices that were taken too."""
    having = [t for t in trials if name in t.params]
    distribution = having[0].distributions[name]
    values = [t.params[name] for t in having]
    if isinstance(distribution, CategoricalDistribution):
        return (len(set(values)) - 1) / max(1, len(distribution.choices) - 1)
    scale = math.log if distribution.log else float
    width = scale(distribution.high) - scale(distribution.low)
    return (scale(max(values)) - scale(min(values))) / width if width > 0 else 0.0


def parallel_coordinate(report: StudyReport) -> go.Figure | None:
    """Optuna's parallel-coordinate plot of the parameters `parallel_params` picks, over the report's plotted
    trials, with the validation accuracy (its axis, colour bar and hover text) in percent; None when no parameter
    varied."""
    params = parallel_params(report)
    if not params:
        return None
    figure = optuna.visualization.plot_parallel_coordinate(report.plotted.study, params=params,
                                                           target_name=OBJECTIVE_NAME)
    labels = list(figure.layout.xaxis.ticktext)
    objective = labels.index(OBJECTIVE_NAME)  # the value labels of an axis are annotations at its x
    figure.for_each_annotation(lambda a: a.update(text=_percent_text(a.text)), selector={"x": objective})
    # long names over two lines: turned to fit, the last one would run past the figure's edge and be hidden
    figure.update_xaxes(ticktext=[_two_lines(label) for label in labels])
    figure.update_layout(margin={"l": 40, "r": 20, "t": 60}, height=520)  # the colour bar goes below
    for trace in figure.data:
        if trace.marker.showscale:
            trace.marker.colorbar.update(tickformat=ACCURACY_TICKS, orientation="h", y=-0.25, yanchor="top",
                                         len=0.5, thickness=12, title_side="top")
        elif trace.customdata is not None:  # [label, value] per axis, for the hover text
            trace.customdata = [[label, _percent_text(value) if label == OBJECTIVE_NAME else value]
                                for label, value in trace.customdata]
    return figure


def _two_lines(label: str, longest: int = 10) -> str:
    """A label longer than `longest` characters broken after its underscores and spaces: label_<br>smoothing."""
    if len(label) <= longest:
        return label
    return label.replace("_", "_<br>").replace(" ", "<br>")


def _percent_text(fraction: str) -> str:
    return f"{float(fraction) * 100:.3g}%"


def study_figures(report: StudyReport) -> dict[str, go.Figure]:
    """Named figures for one study; a plot that needs completed trials is left out when there are none."""
    figures: dict[str, go.Figure] = {}
    if report.history:
        figures["learning curves"] = learning_curves(
            report.history, f"{report.title}: best trial #{report.best.number}, loss and accuracy per epoch")
    plotted = report.plotted  # at most PLOTTED_TRIALS completed trials, a copy in memory (see collect.Plotted)
    if report.best is not None:
        history = plotted.renumbered(optuna.visualization.plot_optimization_history(
            plotted.study, target_name=OBJECTIVE_NAME))
        history.update_yaxes(**accuracy_axis(t.value for t in report.trials if t.state == TrialState.COMPLETE))
        figures["optimization history"] = history
        parallel = parallel_coordinate(report)
        if parallel is not None:
            figures["parallel coordinate"] = parallel
    if report.importances:
        with warnings.catch_warnings():  # the same small-study warning that collect() silences
            warnings.simplefilter("ignore", UserWarning)
            figures["parameter importances"] = optuna.visualization.plot_param_importances(
                plotted.params_study, evaluator=plotted.importances, target_name=OBJECTIVE_NAME)
    if report.result:
        figures["test confusion matrix"] = confusion_figure(
            report.result, f"{report.title}: test confusion matrix (trial #{report.result.trial})")
    return figures

"""Plotly figures of a study: the best trial's curves, Optuna's own plots, and the test confusion matrix.

The HTML report and the dashboard draw the same figures, so both come from here.
"""

from __future__ import annotations

import warnings
import optuna
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from data import printable
from search.records import BestResult
from search.report.collect import StudyReport
from search.studies import OBJECTIVE_NAME
from search.training import EpochMetrics


def learning_curves(history: list[EpochMetrics], title: str) -> go.Figure:
    """Train and validation loss (left) and accuracy (right) per epoch, as the reference plotted them."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    epochs = [m.epoch for m in history]
    for column, metric in ((1, "loss"), (2, "accuracy")):
        for part, dash in (("train", "solid"), ("val", "dash")):
            values = [getattr(m, f"{part}_{metric}") for m in history]
            figure.add_trace(go.Scatter(x=epochs, y=values, mode="lines+markers",
                                        name=f"{'validation' if part == 'val' else part} {metric}",
                                        line={"dash": dash}), row=1, col=column)
        figure.update_xaxes(title_text="epoch", dtick=1 if len(epochs) <= 20 else None, row=1, col=column)
    figure.update_yaxes(tickformat=".0%", row=1, col=2)
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


def study_figures(report: StudyReport) -> dict[str, go.Figure]:
    """Named figures for one study; a plot that needs completed trials is left out when there are none."""
    figures: dict[str, go.Figure] = {}
    if report.history:
        figures["learning curves"] = learning_curves(
            report.history, f"{report.title}: best trial #{report.best.number}, loss and accuracy per epoch")
    plotted = report.plotted  # at most PLOTTED_TRIALS completed trials, a copy in memory (see collect.Plotted)
    if report.best is not None:
        figures["optimization history"] = plotted.renumbered(optuna.visualization.plot_optimization_history(
            plotted.study, target_name=OBJECTIVE_NAME))
        figures["parallel coordinate"] = optuna.visualization.plot_parallel_coordinate(
            plotted.study, target_name=OBJECTIVE_NAME)
    if report.importances:
        with warnings.catch_warnings():  # the same small-study warning that collect() silences
            warnings.simplefilter("ignore", UserWarning)
            figures["parameter importances"] = optuna.visualization.plot_param_importances(
                plotted.params_study, evaluator=plotted.importances, target_name=OBJECTIVE_NAME)
    if report.result:
        figures["test confusion matrix"] = confusion_figure(
            report.result, f"{report.title}: test confusion matrix (trial #{report.result.trial})")
    return figures

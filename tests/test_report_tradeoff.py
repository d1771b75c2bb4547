"""The cross-model figure (accuracy against size and latency), side by side and stacked, its table, the dashboard
copy, the hand-found row.

Studies are written straight into storage with `create_trial`, so nothing trains here.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search.report.tradeoff import Point, pareto_front, smallest_within

LATENCY = {"logreg": {"batch_1": 0.05, "batch_256": 0.002}, "cnn": {"batch_1": 0.8, "batch_256": 0.03}}


def point(size: int, accuracy: float, trial: int = 0, latency: float | None = None) -> Point:
    return Point("s", "model", trial, size, accuracy, latency_ms=latency)


def test_pareto_front_keeps_what_nothing_beats() -> None:
    points = [point(10, 0.5, 0), point(20, 0.4, 1), point(30, 0.7, 2), point(30, 0.6, 3), point(5, 0.5, 4),
              point(100, 0.7, 5), point(200, 0.9, 6)]
    assert [p.trial for p in pareto_front(points)] == [4, 2, 6]  # smallest first; 0 ties 4 on accuracy but is bigger
    assert pareto_front([]) == []
    twins = [point(10, 0.5, 0), point(10, 0.5, 1)]
    assert [p.trial for p in pareto_front(twins)] == [0]


def test_pareto_front_on_latency() -> None:
    points = [point(10, 0.5, 0, latency=2.0), point(1000, 0.8, 1, latency=0.5), point(50, 0.6, 2, latency=1.0)]
    assert [p.trial for p in pareto_front(points)] == [0, 2, 1]
    assert [p.trial for p in pareto_front(points, cost=lambda p: p.latency_ms)] == [1]  # fastest and best


def test_smallest_within_one_point() -> None:
    points = [point(1_000, 0.62, 0), point(500, 0.61, 1), point(100, 0.6, 2), point(500, 0.615, 3)]
    assert smallest_within(points).trial == 3  # 0.61 and 0.615 are within 1 point of 0.62; on a tie, more accurate
    assert smallest_within(points, margin=0.001).trial == 0
    assert smallest_within(points, margin=0.05).trial == 2
    assert smallest_within([point(1, 0.1, 7)]).trial == 7
    assert smallest_within([]) is None


def add_study(url: str, family: str, data_root: Path, trials: list[tuple[TrialState, float | None, int]],
              result: dict | None = None, reference: int | None = None) -> optuna.Study:
    """A study as a search leaves it: `trials` are (state, validation accuracy, trainable parameters).

    `result`: a stored `best` result for the best trial. `reference`: the index of the hand-found trial.
    """
    from search.records import BestResult, TrialRecord
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update

    settings = StudySettings(family=family, n_trials=len(trials), data={
        "dataset": "imagefolder", "data_root": str(data_root), "val_fraction": 0.3, "split_seed": 0,
        "image_size": 32, "weights": "none"})
    study = create_or_update(open_storage(url), family, settings)
    for number, (state, value, size) in enumerate(trials):
        lr = 10 ** (-4 + number * 0.5)
        study.add_trial(create_trial(
            params={"lr": lr}, distributions={"lr": FloatDistribution(1e-5, 1e-1, log=True)}, state=state,
            value=value, intermediate_values={1: PRUNED_AT[size]} if state == TrialState.PRUNED else {},
            user_attrs=TrialRecord(params={"lr": lr, "epochs": 3}, trainable_parameters=size, best_epoch=3,
                                   reason="pruned at epoch 1" if state == TrialState.PRUNED else "completed",
                                   reference=number == reference).user_attrs()))
    if result is not None:
        BestResult(**{"trial": study.best_trial.number, "val_accuracy": study.best_value, "retrained_val_accuracy": None,
                      "test_loss": 1.0, "test_images": 24, "classes": ["a", "b"], "per_class_accuracy": [0.5, 0.5],
                      "confusion_matrix": [[6, 6], [6, 6]], "params": {}, "epochs": 3, "seed": 0, "seconds": 1.0,
                      "full_train": False, "device": "cuda:0", **result}).save(study)
    return study


PRUNED_AT = {40_000: 0.58, 2_000_000: 0.35}  # validation accuracy of the pruned trials' one epoch, by size


@pytest.fixture
def three_models(tmp_path: Path) -> str:
    """logreg and cnn retrained with a latency; mlp searched only, its hand-found setting first and pruned."""
    url = f"sqlite:///{tmp_path}/studies.db"
    complete, pruned = TrialState.COMPLETE, TrialState.PRUNED
    add_study(url, "logreg", tmp_path, [(complete, 0.30, 12_290), (complete, 0.32, 12_290)],
              result={"test_accuracy": 0.31, "trainable_parameters": 12_290, "latency_ms": LATENCY["logreg"]})
    add_study(url, "cnn", tmp_path, [(complete, 0.60, 50_000), (complete, 0.62, 80_000), (pruned, None, 40_000)],
              result={"test_accuracy": 0.615, "trainable_parameters": 80_000, "latency_ms": LATENCY["cnn"]})
    add_study(url, "mlp", tmp_path, [(pruned, None, 2_000_000), (complete, 0.40, 1_000_000),
                                     (complete, 0.41, 3_000_000)], reference=0)
    return url


def test_figure_has_every_model_and_the_front(three_models: str) -> None:
    from search.report.collect import collect
    from search.report.tradeoff import tradeoff_figure

    figure = tradeoff_figure(collect(optuna.storages.RDBStorage(three_models), importances=False))
    legend = [t.name for t in figure.data if t.showlegend is not False]
    assert legend == ["logistic regression", "fully connected net", "CNN", "Pareto front"]  # the families' order
    trials = {t.name: sorted(t.x) for t in figure.data if t.xaxis == "x" and t.marker.symbol is None and t.mode == "markers"}
    assert trials == {"logistic regression": [12_290, 12_290], "CNN": [50_000, 80_000],
                      "fully connected net": [1_000_000, 3_000_000]}  # completed trials, filled
    hollow = {t.name: (list(t.x), list(t.y)) for t in figure.data if t.marker.symbol == "circle-open"}
    assert hollow == {"CNN": ([40_000], [0.58]), "fully connected net": ([2_000_000], [0.35])}  # pruned: hollow
    front = [t for t in figure.data if t.name == "Pareto front"]
    assert [(list(t.x), list(t.y), t.xaxis) for t in front] == [
        ([12_290, 50_000, 80_000], [0.32, 0.60, 0.62], "x"),  # the completed trials' front (not the pruned 40,000)
        ([0.002, 0.03], [0.31, 0.615], "x2")]  # the tested bests' front on latency
    stars = {(t.name, t.xaxis): list(t.y) for t in figure.data if t.marker.symbol == "star"}
    assert stars == {("logistic regression", "x"): [0.31], ("logistic regression", "x2"): [0.31],
                     ("CNN", "x"): [0.615], ("CNN", "x2"): [0.615]}  # mlp is not tested: no star
    assert figure.layout.xaxis.type == figure.layout.xaxis2.type == "log"
    assert "trial #1 retrained" in next(t for t in figure.data if t.marker.symbol == "star").text[0]


def test_stacked_figure_has_the_same_points_in_rows(three_models: str) -> None:
    """The dashboard's form: the same traces, the latency panel under the size panel instead of beside it."""
    from search.report.collect import collect
    from search.report.figures import ACCURACY_TICKS
    from search.report.tradeoff import tradeoff_figure

    reports = collect(optuna.storages.RDBStorage(three_models), importances=False)
    beside, stacked = tradeoff_figure(reports), tradeoff_figure(reports, stacked=True)

    def traces(figure) -> list[tuple]:
        return [(t.name, t.marker.symbol, tuple(t.x), tuple(t.y), t.xaxis, t.yaxis) for t in figure.data]

    assert traces(stacked) == traces(beside)
    layout = stacked.layout
    assert tuple(layout.xaxis.domain) == tuple(layout.xaxis2.domain) == (0.0, 1.0)  # one column
    assert layout.yaxis2.domain[1] < layout.yaxis.domain[0]  # latency below size, not overlapping
    assert beside.layout.xaxis.domain[1] < beside.layout.xaxis2.domain[0]  # the report's: side by side
    titles = [a.text for a in layout.annotations]
    assert titles == ["against trainable parameters", "against ms per image, batch 256"]
    assert layout.annotations[0].y > layout.annotations[1].y
    for axis in (layout.yaxis, layout.yaxis2, beside.layout.yaxis):
        assert axis.tickformat == ACCURACY_TICKS and tuple(axis.range) == (0.25, 0.65)  # 30% .. 62%, 2 to spare
    assert layout.height == 450  # optuna-dashboard draws a saved figure in a card of 450 px


def test_table_and_smallest_line(three_models: str) -> None:
    from search.report.collect import collect
    from search.report.tradeoff import smallest_line, tradeoff_table

    reports = collect(optuna.storages.RDBStorage(three_models), importances=False)
    headers, rows = tradeoff_table(reports)
    assert headers == ["model", "trial", "accuracy", "trainable params", "ms/image, batch 1 / 256"]
    assert rows == [["logistic regression", "#1", "31.00% test", "12,290", "0.05 / 0.002"],
                    ["fully connected net", "#2", "41.00% val", "3,000,000", "-"],
                    ["CNN", "#1", "61.50% test", "80,000", "0.8 / 0.03"]]
    # mlp is untested, so every model is compared on validation: the CNN's 62% is the best and the smallest near it
    assert smallest_line(reports) == (
        "Smallest model within 1 point of the best, on validation accuracy (not every model is tested yet): CNN, "
        "trial #1 (80,000 trainable parameters, 62.00%); it is also the most accurate.")
    tested = [r for r in reports if r.result]
    assert smallest_line(tested, margin=0.5) == (
        "Smallest model within 50 point of the best, on test accuracy: logistic regression, trial #1 "
        "(12,290 trainable parameters, 31.00%); the most accurate is CNN, trial #1 (80,000, 61.50%).")


def test_reference_row_and_markdown(three_models: str) -> None:
    from search.report.collect import collect
    from search.report.markdown import render_markdown

    reports = collect(optuna.storages.RDBStorage(three_models))
    text = render_markdown(reports, "a report", ["header"], {})
    tradeoff = text.index("## Accuracy, size and latency across models")
    assert tradeoff < text.index("## Summary") and "| CNN | #1 | 61.50% test | 80,000 | 0.8 / 0.03 |" in text
    assert "Smallest model within 1 point of the best" in text
    summary = next(line for line in text.splitlines() if line.startswith("| fully connected net | mlp |"))
    assert summary.endswith("| pruned |")  # the hand-found setting's column: the trial was pruned
    assert text.count("### Hand-found setting against the searched best") == 1  # mlp only: the others ran none
    section = text[text.index("### Hand-found setting against the searched best"):]
    for row in ("| trial | #0 | #2 |  |", "| state | pruned | complete |  |", "| val acc | pruned | 41.00% |  |",
                "| test acc | - | - |  |", "| trainable params | 2,000,000 | 3,000,000 |  |",
                "| why it ended | pruned at epoch 1 |  |  |", "| epochs | 3 | 3 |  |", "| lr | 0.0001 | 0.001 | changed |"):
        assert row in section, row
    assert "| 0 (hand-found) | pruned |" in section  # and the trials table names it


def test_dashboard_gets_the_figure_on_every_study(three_models: str) -> None:
    from search.dashboard import TRADEOFF_PLOT_ID, save_tradeoff_plots

    storage = optuna.storages.RDBStorage(three_models)

    def plot_keys() -> dict[str, int]:
        return {s.study_name: sum(k.startswith(f"dashboard:plot_data:{TRADEOFF_PLOT_ID}:")
                                  for k in storage.get_study_system_attrs(s._study_id))
                for s in storage.get_all_studies()}

    assert save_tradeoff_plots(storage) == 3
    first = plot_keys()
    assert set(first) == {"logreg", "cnn", "mlp"} and all(first.values())
    assert save_tradeoff_plots(storage) == 3
    assert plot_keys() == first  # the same id: replaced, not added
    prefix = f"dashboard:plot_data:{TRADEOFF_PLOT_ID}:"  # the figure's JSON, in numbered pieces
    for summary in storage.get_all_studies():
        attrs = storage.get_study_system_attrs(summary._study_id)
        pieces = sorted((int(key.removeprefix(prefix)), text) for key, text in attrs.items() if key.startswith(prefix))
        saved = json.loads("".join(text for _, text in pieces))
        assert saved["layout"]["xaxis2"]["domain"] == saved["layout"]["xaxis"]["domain"]  # stacked for the card


def test_without_latency_or_completed_trials(tmp_path: Path) -> None:
    from search.report.collect import collect
    from search.report.html import render_html
    from search.report.tradeoff import smallest_line, tradeoff_figure

    url = f"sqlite:///{tmp_path}/studies.db"
    add_study(url, "mlp", tmp_path, [(TrialState.PRUNED, None, 2_000_000)])
    reports = collect(optuna.storages.RDBStorage(url), importances=False)
    only_pruned = tradeoff_figure(reports)
    assert [t.marker.symbol for t in only_pruned.data if t.mode == "markers"] == ["circle-open"]
    assert smallest_line(reports) == "No model has a completed trial with a parameter count yet."
    assert "No model has a completed trial with a parameter count yet." in render_html(reports, "a report", [], {})
    assert tradeoff_figure([]) is None  # no study at all: no figure

    add_study(url, "logreg", tmp_path, [(TrialState.COMPLETE, 0.3, 12_290)],
              result={"test_accuracy": 0.29, "trainable_parameters": 12_290})  # tested before latency was measured
    figure = tradeoff_figure(collect(optuna.storages.RDBStorage(url), importances=False))
    assert [t.xaxis for t in figure.data] == ["x", "x", "x", "x"]  # mlp's pruned, logreg's trial and star, front
    # and nothing on the latency panel
    assert "no latency stored yet" in figure.layout.annotations[-1].text

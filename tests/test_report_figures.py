"""A study's figures read well: the parallel coordinates show at most 8 parameters, the most important first, and
every accuracy axis is in percent over a range around its values.

Studies are written straight into storage with `create_trial`, so nothing trains here. How the figures look in a
browser is checked in test_report_browser.py.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from search.report.figures import ACCURACY_TICKS, accuracy_axis

N_TRIALS = 12
WIDE = [f"p{k:02d}" for k in range(12)]  # p{k} spreads over (k + 1) / 13 of its range


def many_params_study(tmp_path: Path) -> str:
    """A CNN study of 14 parameters whose spread over their range is known: p00..p11 a float each, spreading over
    1/13..12/13 of [0, 1]; `kind`, 2 of its 3 choices (spread 1/2); `lr`, 1e-2..1e-1 of [1e-4, 1e-1] (a third of
    the range on its log scale, 90% on a linear one); `fixed`, one value. Trial i reaches 30% + 3 points x i."""
    from search.records import TrialRecord
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update
    from search.training import EpochMetrics

    url = f"sqlite:///{tmp_path}/studies.db"
    settings = StudySettings(family="cnn", n_trials=N_TRIALS, data={
        "dataset": "imagefolder", "data_root": str(tmp_path), "val_fraction": 0.3, "split_seed": 0,
        "image_size": 32, "weights": "none"})
    study = create_or_update(open_storage(url), "cnn", settings)
    distributions = {name: FloatDistribution(0.0, 1.0) for name in WIDE} | {
        "kind": CategoricalDistribution(["a", "b", "c"]), "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "fixed": FloatDistribution(0.0, 1.0)}
    for i in range(N_TRIALS):
        share = i / (N_TRIALS - 1)
        params = {name: share * (k + 1) / 13 for k, name in enumerate(WIDE)} | {
            "kind": "ab"[i % 2], "lr": 10 ** (-2 + share), "fixed": 0.5}
        accuracy = 0.3 + 0.03 * i
        history = [EpochMetrics(e, 2 - 0.2 * e, accuracy - 0.05 * (2 - e), 2.1 - 0.15 * e, accuracy - 0.04 * (2 - e),
                                0.5) for e in (1, 2)]
        study.add_trial(create_trial(
            params=params, distributions=distributions, value=accuracy, state=TrialState.COMPLETE,
            user_attrs=TrialRecord(history=history, best_epoch=2, params=params, trainable_parameters=1_000,
                                   reason="completed 2 epochs").user_attrs()))
    return url


@pytest.fixture
def study_url(tmp_path: Path) -> str:
    return many_params_study(tmp_path)


def test_parallel_coordinate_shows_the_8_most_important(study_url: str) -> None:
    from search.report.collect import collect
    from search.report.figures import parallel_params, study_figures

    report = collect(optuna.storages.RDBStorage(study_url))[0]
    assert report.importances is not None and len(report.importances) > 8
    chosen = parallel_params(report)
    assert chosen == [name for name in report.importances if name != "fixed"][:8]
    figure = study_figures(report)["parallel coordinate"]
    labels = [label.replace("<br>", " ") for label in figure.layout.xaxis.ticktext]
    assert sorted(labels) == sorted(["validation accuracy", *chosen])  # the objective's axis and the 8


def test_without_importances_the_widest_spread_parameters(study_url: str) -> None:
    from search.report.collect import collect
    from search.report.figures import parallel_params

    report = collect(optuna.storages.RDBStorage(study_url), importances=False)[0]
    assert report.importances is None
    # lr covers 90% of its range on a linear scale, a third on the log scale it was sampled on; fixed never varied
    assert parallel_params(report) == ["p11", "p10", "p09", "p08", "p07", "p06", "kind", "p05"]
    assert parallel_params(report, limit=20) == ["p11", "p10", "p09", "p08", "p07", "p06", "kind", "p05", "p04", "lr",
                                                 "p03", "p02", "p01", "p00"]


def test_every_accuracy_axis_is_in_percent(study_url: str) -> None:
    from search.report.collect import collect
    from search.report.figures import study_figures

    report = collect(optuna.storages.RDBStorage(study_url))[0]
    figures = study_figures(report)
    values = [t.value for t in report.trials]  # 30% .. 63%
    history = figures["optimization history"].layout.yaxis
    assert history.tickformat == ACCURACY_TICKS and tuple(history.range) == (0.25, 0.65)
    assert min(values) >= history.range[0] and max(values) <= history.range[1]
    curves = figures["learning curves"].layout
    assert curves.yaxis2.title.text == "accuracy" and curves.yaxis2.tickformat == ACCURACY_TICKS
    assert curves.yaxis.title.text == "loss" and curves.yaxis.tickformat is None

    parallel = figures["parallel coordinate"]
    objective = [a.text for a in parallel.layout.annotations if a.x == 0]  # its axis's value labels
    assert objective == ["30%", "38.2%", "46.5%", "54.7%", "63%"]  # Optuna rounds to 3 digits
    scale = next(t for t in parallel.data if t.marker.showscale)
    assert scale.marker.colorbar.tickformat == ACCURACY_TICKS
    hover = next(t for t in parallel.data if t.customdata is not None and not t.marker.showscale).customdata
    assert hover[0][0] == "validation accuracy" and hover[0][1].endswith("%")


@pytest.mark.parametrize(("values", "expected"), [
    ([0.31, 0.69], [0.25, 0.75]),  # the 5-point steps around, 2 points to spare
    ([0.3, 0.7], [0.25, 0.75]),
    ([0.62, None, float("nan")], [0.6, 0.65]),  # what is no number is left out
    ([0.99], [0.95, 1.0]), ([0.0], [0.0, 0.05]),  # never past 0 or 100%
    ([], [0.0, 1.0]),
])
def test_accuracy_axis_range(values: list, expected: list[float]) -> None:
    axis = accuracy_axis(values)
    assert axis["tickformat"] == ACCURACY_TICKS and axis["range"] == pytest.approx(expected)

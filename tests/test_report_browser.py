"""report.html in headless Chromium: every plot renders, offline, and the page logs no error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=10000"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")]


def fake_study(url: str, data_root: Path, family: str = "logreg", states: str = "cccpf", size: int = 12_292,
               tested: bool = True, reference: int | None = None) -> None:
    """A study as a search leaves it, one trial per letter of `states` (c complete, p pruned, f failed).

    `tested`: a `best` result with a latency is stored. `reference`: that trial ran the hand-found setting.
    """
    from search.records import BestResult, TrialRecord
    from search.storage import open_storage
    from search.training import EpochMetrics
    from search.studies import StudySettings, create_or_update

    settings = StudySettings(family=family, n_trials=len(states), data={
        "dataset": "imagefolder", "data_root": str(data_root), "val_fraction": 0.3, "split_seed": 0,
        "image_size": 32, "weights": "none"})
    study = create_or_update(open_storage(url), family, settings)
    distributions = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "optimizer": CategoricalDistribution(["adam", "sgd"])}
    for number, letter in enumerate(states):
        params = {"lr": 10 ** (-4 + number * 0.5), "optimizer": ["adam", "sgd"][number % 2]}
        history = [EpochMetrics(e, 2 - 0.2 * e, 0.2 + 0.05 * e + 0.01 * number, 2.1 - 0.15 * e,
                                0.2 + 0.04 * e + 0.01 * number, 0.5) for e in range(1, 4)]
        state = {"c": TrialState.COMPLETE, "p": TrialState.PRUNED, "f": TrialState.FAIL}[letter]
        reason = {"p": "pruned at epoch 1: validation accuracy 24.00%", "f": "diverged at epoch 2: training loss is nan"}
        study.add_trial(create_trial(
            params=params, distributions=distributions, state=state,
            value=max(m.val_accuracy for m in history) if state == TrialState.COMPLETE else None,
            user_attrs=TrialRecord(history=history if state == TrialState.COMPLETE else history[:1], best_epoch=3,
                                   params={**params, "epochs": 3, "batch_size": 64}, seed=number,
                                   reason=reason.get(letter, "completed 3 epochs; best at epoch 3"),
                                   trainable_parameters=size * (1 + number % 3), seconds=1.5 + number,
                                   reference=number == reference).user_attrs()))
    if not tested:
        return
    classes = ["circle", "cross", "horizontal", "vertical"]
    BestResult(trial=study.best_trial.number, val_accuracy=study.best_value, retrained_val_accuracy=None, test_loss=0.91,
               test_accuracy=0.625, test_images=24, per_class_accuracy=[0.5, 0.5, 0.75, 0.75], classes=classes,
               confusion_matrix=[[3, 1, 1, 1], [1, 3, 1, 1], [0, 1, 4, 1], [0, 0, 2, 4]],
               trainable_parameters=TrialRecord.load(study.best_trial).trainable_parameters, params={}, epochs=3,
               seed=3, seconds=1.0, full_train=False, device="cuda:0",
               latency_ms={"batch_1": 0.4, "batch_256": 0.01}).save(study)


def test_report_renders_in_chromium(tiny_imagefolder: Path, tmp_path: Path) -> None:
    """The cross-model figure first, with every model and the Pareto front, then each study's plots."""
    from search.cli import main

    url = f"sqlite:///{tmp_path}/studies.db"
    fake_study(url, tiny_imagefolder)
    fake_study(url, tiny_imagefolder, family="mlp", states="pcc", size=3_000_000, tested=False, reference=0)
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--format", "html", "--storage", url,
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    page = out / "report.html"
    expected_plots = page.read_text().count('class="plot"')
    # the cross-model figure; logreg: curves, history, parallel coordinate, importances, confusion matrix;
    # mlp (2 completed, untested): curves, history, parallel coordinate
    assert expected_plots == 1 + 5 + 3

    profile = tmp_path / "chromium-profile"
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    errors = re.search(r'<html[^>]*data-errors="([^"]*)"', dom)
    assert errors is not None, "the error recorder did not run"
    assert json.loads(errors.group(1).replace("&quot;", '"')) == []
    plots = re.findall(r'<div class="plot" data-plot="(\d+)">(.*?)(?=<div class="plot"|<h3>Trials)', dom, re.DOTALL)
    assert len(plots) == expected_plots
    for number, plot in plots:
        assert "js-plotly-plot" in plot and 'class="main-svg"' in plot, f"plot {number} did not render"

    first_number, first = plots[0]
    assert first_number == "1" and dom.index(first) < dom.index("<h2>Summary</h2>")  # the page's first plot
    assert "Accuracy against trainable parameters and latency" in first
    legend = re.findall(r'class="legendtext"[^>]*>([^<]*)<', first)
    assert legend == ["logistic regression", "fully connected net", "Pareto front"], legend
    assert len(re.findall(r'class="point"', first)) >= 3 + 2 + 2  # trials of both, the star on both panels
    assert "Hand-found setting against the searched best" in dom and "0 (hand-found)" in dom

    screenshot = tmp_path / "report.png"
    subprocess.run([*command, "--window-size=1280,4000", f"--screenshot={screenshot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    shutil.rmtree(profile, ignore_errors=True)

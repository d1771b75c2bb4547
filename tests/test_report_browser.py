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


def fake_study(url: str, data_root: Path) -> None:
    """A logreg study as a search leaves it (complete, pruned and failed trials) plus a `best` result."""
    from search.best import BEST_ATTR
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update

    settings = StudySettings(family="logreg", n_trials=6, data={
        "dataset": "imagefolder", "data_root": str(data_root), "val_fraction": 0.3, "split_seed": 0,
        "image_size": 32, "weights": "none"})
    study = create_or_update(open_storage(url), "logreg", settings)
    distributions = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "optimizer": CategoricalDistribution(["adam", "sgd"])}
    for number in range(6):
        params = {"lr": 10 ** (-4 + number * 0.5), "optimizer": ["adam", "sgd"][number % 2]}
        history = [{"epoch": e, "train_loss": 2 - 0.2 * e, "train_accuracy": 0.2 + 0.05 * e + 0.01 * number,
                    "val_loss": 2.1 - 0.15 * e, "val_accuracy": 0.2 + 0.04 * e + 0.01 * number, "seconds": 0.5}
                   for e in range(1, 4)]
        state = TrialState.PRUNED if number == 4 else TrialState.FAIL if number == 5 else TrialState.COMPLETE
        reason = {4: "pruned at epoch 1: validation accuracy 24.00%", 5: "diverged at epoch 2: training loss is nan"}
        study.add_trial(create_trial(
            params=params, distributions=distributions, state=state,
            value=max(h["val_accuracy"] for h in history) if state == TrialState.COMPLETE else None,
            user_attrs={"history": history if state == TrialState.COMPLETE else history[:1], "best_epoch": 3,
                        "params": {**params, "epochs": 3, "batch_size": 64}, "seed": number,
                        "reason": reason.get(number, "completed 3 epochs; best at epoch 3"),
                        "trainable_parameters": 12_292}))
    classes = ["circle", "cross", "horizontal", "vertical"]
    study.set_user_attr(BEST_ATTR, {
        "trial": study.best_trial.number, "val_accuracy": study.best_value, "test_loss": 0.91, "test_accuracy": 0.625,
        "test_images": 24, "per_class_accuracy": [0.5, 0.5, 0.75, 0.75], "classes": classes,
        "confusion_matrix": [[3, 1, 1, 1], [1, 3, 1, 1], [0, 1, 4, 1], [0, 0, 2, 4]], "trainable_parameters": 12_292,
        "params": {}, "seed": 3, "seconds": 1.0, "full_train": False, "device": "cpu"})


def test_report_renders_in_chromium(tiny_imagefolder: Path, tmp_path: Path) -> None:
    from search.cli import main

    url = f"sqlite:///{tmp_path}/studies.db"
    fake_study(url, tiny_imagefolder)
    out = tmp_path / "report"
    assert main(["report", "--out", str(out), "--format", "html", "--storage", url,
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    page = out / "report.html"
    expected_plots = page.read_text().count('class="plot"')
    assert expected_plots == 5  # curves, history, parallel coordinate, importances, confusion matrix

    profile = tmp_path / "chromium-profile"
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    errors = re.search(r'<html[^>]*data-errors="([^"]*)"', dom)
    assert errors is not None, "the error recorder did not run"
    assert json.loads(errors.group(1).replace("&quot;", '"')) == []
    plots = re.findall(r'<div class="plot" data-plot="\d+">(.*?)(?=<div class="plot"|<h3>Trials)', dom, re.DOTALL)
    assert len(plots) == expected_plots
    for number, plot in enumerate(plots, 1):
        assert "js-plotly-plot" in plot and 'class="main-svg"' in plot, f"plot {number} did not render"

    screenshot = tmp_path / "report.png"
    subprocess.run([*command, "--window-size=1280,4000", f"--screenshot={screenshot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    shutil.rmtree(profile, ignore_errors=True)

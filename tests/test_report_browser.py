"""report.html and the dashboard's cross-model figure in headless Chromium: every plot renders, offline, without an
error, and reads well at 800, 1100 and 1400 px (margins, no text over text, percent on accuracy axes).

Layout is measured inside the page: a probe script appended to the page writes what it measures into an attribute of
<html>, which --dump-dom carries out; the same run saves a screenshot.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=10000"]
WIDTHS = (800, 1100, 1400)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")]

# Measures the page into <html data-layout>: the window, the first heading and paragraph, and per plotly figure
# every text it drew (figure title, annotations, axis titles, tick labels, legend, colour bar) with its box, in
# groups (one per axis's tick labels, one per annotation...) so that the test can tell text over text apart from
# labels of one axis; and its axes and colour bars by title, with their tick labels. Measured again every second
# of the page's (virtual) time, so the last measurement sees every plot, also those a dashboard draws late.
LAYOUT_PROBE = """(function () {
  function box(element) {
    var r = element.getBoundingClientRect();
    return [r.left, r.top, r.right, r.bottom];
  }
  function texts(root, selector, group) {
    return Array.prototype.filter.call(root.querySelectorAll(selector), function (t) {
      return t.textContent.trim() !== "" && t.getBoundingClientRect().width > 0;
    }).map(function (t) { return {group: group, text: t.textContent, box: box(t)}; });
  }
  function figure(gd) {
    var full = gd._fullLayout, drawn = [], axes = [], annotations = [], colorbars = [];
    drawn = drawn.concat(texts(gd, ".g-gtitle text", "title"), texts(gd, ".legendtext", "legend"));
    Object.keys(full).filter(function (k) { return /^[xy]axis[0-9]*$/.test(k); }).forEach(function (k) {
      var axis = full[k], ticks = texts(gd, "g." + axis._id + "tick text", axis._id + " ticks");
      axes.push({id: axis._id, title: (axis.title && axis.title.text) || "", ticks: ticks.map(function (t) { return t.text; })});
      drawn = drawn.concat(ticks, texts(gd, ".g-" + axis._id + "title text", axis._id + " title"));
    });
    Array.prototype.forEach.call(gd.querySelectorAll("g.annotation"), function (g) {
      var index = Number(g.getAttribute("data-index")), spec = full.annotations[index];
      annotations.push({text: g.textContent, x: spec.x, xref: spec.xref});
      drawn = drawn.concat(texts(g, "text", "annotation " + index));
    });
    Array.prototype.forEach.call(gd.querySelectorAll("g.colorbar"), function (g, index) {
      var title = texts(g, ".cbtitle text", "colour bar " + index + " title");
      var ticks = texts(g, ".cbaxis text", "colour bar " + index + " ticks");
      colorbars.push({title: title.map(function (t) { return t.text; }).join(" "),
                      ticks: ticks.map(function (t) { return t.text; })});
      drawn = drawn.concat(title, ticks);
    });
    var shown = Array.prototype.filter.call(gd.querySelectorAll(".modebar-group"), function (g) {
      return Number(getComputedStyle(g).opacity) > 0;
    });
    drawn = drawn.concat(shown.map(function (g) { return {group: "mode bar", text: "(mode bar)", box: box(g)}; }));
    var holder = gd.closest(".plot, .MuiCard-root") || gd, heading = holder;
    while (heading && !/^H[1-6]$/.test(heading.tagName)) {  // the nearest heading before the figure
      heading = heading.previousElementSibling || heading.parentElement;
    }
    return {id: gd.id, heading: heading ? heading.textContent : "", svg: box(gd.querySelector(".main-svg")),
            holder: box(holder), texts: drawn, axes: axes, annotations: annotations, colorbars: colorbars};
  }
  function first(selector) {
    var element = document.querySelector(selector);
    return element ? box(element) : null;
  }
  function measure() {
    var figures = Array.prototype.filter.call(document.querySelectorAll(".js-plotly-plot"), function (gd) {
      return gd._fullLayout && gd.querySelector(".main-svg");
    });
    document.documentElement.setAttribute("data-layout", JSON.stringify({
      width: window.innerWidth, scroll_width: document.documentElement.scrollWidth,
      h1: first("h1"), paragraph: first("body > p"), figures: figures.map(figure)}));
  }
  window.addEventListener("load", measure);
  setInterval(measure, 1000);
})();
"""


def open_in_chromium(url: str, width: int, screenshot: Path, profile: Path) -> str:
    """The DOM of `url` after its scripts ran, at a window `width` px wide; the same run saves a screenshot of the
    page's top 3000 px."""
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},3000",
               f"--screenshot={screenshot}", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def recorded(dom: str, attribute: str) -> Any:
    """The JSON a script of the page wrote into an attribute of <html>; None when none did."""
    found = re.search(rf'<html[^>]*{attribute}="([^"]*)"', dom)
    if found is None:
        return None
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def overlaps(figure: dict[str, Any]) -> list[tuple[str, str]]:
    """Pairs of texts of different groups whose boxes overlap by more than a pixel each way."""
    found = []
    texts = figure["texts"]
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            if a["group"] != b["group"] and _intersect(a["box"], b["box"]):
                found.append((f"{a['group']}: {a['text']}", f"{b['group']}: {b['text']}"))
    return found


def _intersect(a: list[float], b: list[float], slack: float = 1.0) -> bool:
    """Boxes are [left, top, right, bottom]."""
    return (min(a[2], b[2]) - max(a[0], b[0]) > slack) and (min(a[3], b[3]) - max(a[1], b[1]) > slack)


def outside(figure: dict[str, Any], slack: float = 1.0) -> list[str]:
    """Texts that stick out of the figure's own drawing (cut off where the figure ends)."""
    left, top, right, bottom = figure["svg"]
    return [t["text"] for t in figure["texts"] if t["box"][0] < left - slack or t["box"][2] > right + slack
            or t["box"][1] < top - slack or t["box"][3] > bottom + slack]


def accuracy_axes(figure: dict[str, Any]) -> dict[str, list[str]]:
    """Every accuracy axis of a figure, by name, with its tick labels: the cartesian axes and colour bars titled
    with "accuracy", and a parallel-coordinate dimension labelled so (its ticks are annotations at its x)."""
    found = {f"axis {a['id']} ({a['title']})": a["ticks"] for a in figure["axes"] if "accuracy" in a["title"]}
    found |= {f"colour bar ({c['title']})": c["ticks"] for c in figure["colorbars"] if "accuracy" in c["title"]}
    if _is_parallel_coordinate(figure):
        labels = next(a["ticks"] for a in figure["axes"] if a["id"] == "x")
        for index, label in enumerate(labels):
            if "accuracy" in label:
                found[f"dimension {label}"] = [a["text"] for a in figure["annotations"] if a["x"] == index]
    return found


def _is_parallel_coordinate(figure: dict[str, Any]) -> bool:
    return figure["heading"] == "Parallel coordinate"


def check_figure(figure: dict[str, Any]) -> None:
    name = figure["heading"] or figure["id"]
    assert overlaps(figure) == [], f"{name}: text over text"
    assert outside(figure) == [], f"{name}: text cut off"
    for axis, ticks in accuracy_axes(figure).items():
        assert ticks and all(t.endswith("%") for t in ticks), f"{name}, {axis}: {ticks}"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


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
    screenshot = tmp_path / "report.png"
    dom = open_in_chromium(page.as_uri(), 1280, screenshot, profile)
    assert recorded(dom, "data-errors") == [], "the page logged errors (or its error recorder did not run)"
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

    assert_png(screenshot)
    shutil.rmtree(profile, ignore_errors=True)


def searched_study(url: str, data_root: Path, family: str, n_trials: int, size: int, tested: bool = False) -> None:
    """A study of `family`'s own search space sampled at random, as a search leaves it: every parameter the family
    searches is there (the CNN's 27, of which `epochs` is fixed). Trial i reaches a validation accuracy of
    30% + 4 points x (7i mod 11). `tested`: a `best` result with a latency is stored.
    """
    import optuna

    from search.family import get_family
    from search.records import BestResult, TrialRecord
    from search.space import suggest
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update
    from search.training import EpochMetrics

    settings = StudySettings(family=family, n_trials=n_trials, data={
        "dataset": "imagefolder", "data_root": str(data_root), "val_fraction": 0.3, "split_seed": 0,
        "image_size": 32, "weights": "none"})
    study = create_or_update(open_storage(url), family, settings)
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    for number in range(n_trials):
        trial = study.ask()
        params = suggest(trial, get_family(family).dims())
        accuracy = 0.3 + 0.04 * (7 * number % 11)
        history = [EpochMetrics(e, 2 - 0.2 * e, accuracy - 0.05 * (3 - e), 2.1 - 0.15 * e, accuracy - 0.04 * (3 - e),
                                0.5) for e in range(1, 4)]
        record = TrialRecord(history=history, best_epoch=3, params=params, seed=number, reason="completed 3 epochs",
                             trainable_parameters=size + 1_000 * number, seconds=2.0)
        for key, value in record.user_attrs().items():
            trial.set_user_attr(key, value)
        study.tell(trial, accuracy)
    if tested:
        best = study.best_trial
        BestResult(trial=best.number, val_accuracy=best.value, retrained_val_accuracy=None, test_loss=0.9,
                   test_accuracy=best.value - 0.01, test_images=24, per_class_accuracy=[0.5, 0.5, 0.75, 0.75],
                   classes=["circle", "cross", "horizontal", "vertical"],
                   confusion_matrix=[[3, 1, 1, 1], [1, 3, 1, 1], [0, 1, 4, 1], [0, 0, 2, 4]],
                   trainable_parameters=TrialRecord.load(best).trainable_parameters, params={}, epochs=3, seed=3,
                   seconds=1.0, full_train=False, device="cuda:0",
                   latency_ms={"batch_1": 0.8, "batch_256": 0.03}).save(study)


@pytest.fixture(scope="module")
def three_searches(tiny_imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The storage of a search of three models: logreg and the CNN tested, the MLP searched only."""
    url = f"sqlite:///{tmp_path_factory.mktemp('searches')}/studies.db"
    fake_study(url, tiny_imagefolder)
    searched_study(url, tiny_imagefolder, "mlp", n_trials=8, size=1_000_000)
    searched_study(url, tiny_imagefolder, "cnn", n_trials=20, size=80_000, tested=True)
    return url


@pytest.fixture(scope="module")
def probed_report(three_searches: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of the three searches, with the layout probe appended to its body."""
    from search.cli import main

    out = tmp_path_factory.mktemp("report")
    assert main(["report", "--out", str(out), "--format", "html", "--storage", three_searches,
                 "--cache-dir", str(out / "cache")]) == 0
    page = out / "report.html"
    probed = out / "probed.html"
    probed.write_text(page.read_text().replace("</body>", f"<script>{LAYOUT_PROBE}</script>\n</body>"))
    return probed


@pytest.mark.parametrize("width", WIDTHS)
def test_report_layout(probed_report: Path, width: int, tmp_path: Path) -> None:
    """Margins around the text, no text drawn over text or cut off in any figure, at most 8 parameters in the
    parallel coordinates and percent on every accuracy axis, at each window width."""
    screenshot = tmp_path / f"report-{width}.png"
    dom = open_in_chromium(probed_report.as_uri(), width, screenshot, tmp_path / "chromium-profile")
    assert recorded(dom, "data-errors") == []
    layout = recorded(dom, "data-layout")
    assert layout is not None, "the layout probe did not run"
    assert layout["width"] == width
    for element in ("h1", "paragraph"):
        left, _, right, _ = layout[element]
        assert left > 0 and right < width, f"{element} touches the window's edge: {layout[element]}"
    assert layout["scroll_width"] <= width  # nothing wider than the window

    assert len(layout["figures"]) == probed_report.read_text().count('class="plot"')  # every figure drawn
    for figure in layout["figures"]:
        check_figure(figure)
    parallel = [f for f in layout["figures"] if _is_parallel_coordinate(f)]
    dimensions = [next(a["ticks"] for a in f["axes"] if a["id"] == "x") for f in parallel]
    # the objective and the parameters: logreg's 2 (lr, optimizer), the MLP's and the CNN's 8 most important
    assert [len(d) for d in dimensions] == [1 + 2, 1 + 8, 1 + 8], dimensions
    found = [(f["heading"], len(accuracy_axes(f))) for f in layout["figures"] if accuracy_axes(f)]
    assert found == [("Accuracy, size and latency across models", 1)] + [  # the panels share theirs
        ("Learning curves", 1), ("Optimization history", 1), ("Parallel coordinate", 2)] * 3  # its axis, colour bar
    assert_png(screenshot)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # no access log in the test output
        pass


def _with_probe(app: Any) -> Any:
    """optuna-dashboard's WSGI app with the layout probe appended to every HTML page it serves, as a script of its
    own at /layout-probe.js: the dashboard's Content-Security-Policy refuses inline scripts."""

    def probed(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/layout-probe.js":
            start_response("200 OK", [("Content-Type", "text/javascript")])
            return [LAYOUT_PROBE.encode()]
        answer: dict[str, Any] = {}
        body = b"".join(app(environ, lambda status, headers, *_: answer.update(status=status, headers=headers)))
        headers = answer["headers"]
        if any(k.lower() == "content-type" and v.startswith("text/html") for k, v in headers):
            body = body.replace(b"</body>", b'<script src="/layout-probe.js"></script></body>')
            headers = [(k, str(len(body)) if k.lower() == "content-length" else v) for k, v in headers]
        start_response(answer["status"], headers)
        return [body]

    return probed


@pytest.fixture(scope="module")
def dashboard(three_searches: str) -> Iterator[str]:
    """optuna-dashboard (with the layout probe) on the three searches, after `best` saved its plots: the address of
    the CNN's study page."""
    import optuna
    from optuna_dashboard import wsgi

    from search.dashboard import save_tradeoff_plots

    storage = optuna.storages.RDBStorage(three_searches)
    assert save_tradeoff_plots(storage) == 3
    study_id = storage.get_study_id_from_name("cnn")
    server = make_server("127.0.0.1", 0, _with_probe(wsgi(storage)), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/dashboard/studies/{study_id}"
    finally:
        server.shutdown()
        thread.join(timeout=30)
        server.server_close()


@pytest.mark.parametrize("width", WIDTHS)
def test_dashboard_tradeoff_card_layout(dashboard: str, width: int, tmp_path: Path) -> None:
    """In optuna-dashboard's half-width card, the cross-model figure fits the card, draws no text over text and
    none cut off, and its accuracy axes are in percent."""
    from search.dashboard import TRADEOFF_PLOT_ID

    screenshot = tmp_path / f"dashboard-{width}.png"
    dom = open_in_chromium(dashboard, width, screenshot, tmp_path / "chromium-profile")
    layout = recorded(dom, "data-layout")
    assert layout is not None, "the layout probe did not run"
    figure = next((f for f in layout["figures"] if f["id"] == f"user-defined-plot:{TRADEOFF_PLOT_ID}"), None)
    assert figure is not None, "the dashboard did not draw the cross-model figure"
    card_left, card_top, card_right, card_bottom = figure["holder"]
    svg_left, svg_top, svg_right, svg_bottom = figure["svg"]
    assert card_right - card_left < width / 2  # the half-width card
    assert card_left <= svg_left and svg_right <= card_right and card_top <= svg_top and svg_bottom <= card_bottom
    check_figure(figure)
    assert len(accuracy_axes(figure)) == 2  # one per panel
    assert_png(screenshot)

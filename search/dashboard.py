"""optuna-dashboard on the studies' storage, with the weights artifacts and the plots Optuna does not draw.

The dashboard already shows history, importances and parallel coordinates; what it lacks are the best
trial's learning curves and the test confusion matrix, saved on the study with its own custom-plot API.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable

import optuna
from optuna.artifacts import FileSystemArtifactStore

from search.errors import UserError
from search.family import get_family
from search.records import BestResult, TrialRecord
from search.studies import load_settings

CURVES_PLOT_ID = "best-trial-learning-curves"
CONFUSION_PLOT_ID = "test-confusion-matrix"
TRADEOFF_PLOT_ID = "accuracy-size-latency"


def save_tradeoff_plots(storage: optuna.storages.BaseStorage, prefix: str = "") -> int:
    """Save the report's cross-model figure (accuracy against size and latency) on every study of `prefix`, its
    panels stacked for the dashboard's half-width card.

    A dashboard plot belongs to one study, so each study gets the same figure, under a fixed id: saving again
    replaces it. Returns how many studies got it (none while no model has a completed trial). Its points are each
    study's PLOTTED_TRIALS most recent trials and its best tenth of that many (every trial of a smaller study),
    read without the rest: `best` refreshes it, and its cost must not grow with the studies.
    """
    from optuna_dashboard import save_plotly_graph_object

    from search.report.collect import PLOTTED_TRIALS, collect
    from search.report.tradeoff import tradeoff_figure

    reports = collect(storage, prefix, importances=False, latest=PLOTTED_TRIALS)
    figure = tradeoff_figure(reports, stacked=True)
    if figure is None:
        return 0
    for report in reports:
        save_plotly_graph_object(report.study, figure, graph_object_id=TRADEOFF_PLOT_ID)
    return len(reports)


def save_dashboard_plots(storage: optuna.storages.BaseStorage, study: optuna.Study, result: BestResult) -> None:
    """Store the tested trial's curves and the test confusion matrix as the study's custom dashboard plots.

    Fixed plot ids, so running `best` again replaces the plots instead of adding more. The cross-model figure,
    which this result changes too, is refreshed once `best` has tested every study (`save_tradeoff_plots`).
    """
    from optuna_dashboard import save_plotly_graph_object

    from search.report.figures import confusion_figure, learning_curves

    family = load_settings(study).family
    title = get_family(family).title
    study_id = storage.get_study_id_from_name(study.study_name)
    trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, result.trial))
    history = TrialRecord.load(trial).history
    if history:
        figure = learning_curves(history, f"{title}: trial #{trial.number}, loss and accuracy per epoch")
        save_plotly_graph_object(study, figure, graph_object_id=CURVES_PLOT_ID)
    figure = confusion_figure(result, f"{title}: test confusion matrix (trial #{trial.number} retrained)")
    save_plotly_graph_object(study, figure, graph_object_id=CONFUSION_PLOT_ID)


def check_host(host: str, allow_remote: bool) -> str | None:
    """None for a loopback address; for any other, a warning if `allow_remote`, else a UserError.

    optuna-dashboard has no authentication, and its API deletes studies and uploads and deletes artifacts:
    listening beyond this machine must be a choice, not a typo. Only "localhost" and loopback IPs count
    as loopback; a host name is not resolved.
    """
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    if not allow_remote:
        raise UserError(f"--host {host} would let anyone who reaches this machine delete studies and artifacts "
                        "(optuna-dashboard has no login); prefer an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST), "
                        "or pass --allow-remote if you mean it")
    return (f"warning: the dashboard on {host} is open to anyone who reaches this machine, without a login: they "
            "can read, change and delete studies and artifacts")


def serve(storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore, host: str, port: int,
          on_ready: Callable[[str], None] = print) -> None:
    """Run the dashboard until Ctrl-C: bind first, tell `on_ready` the address it listens on, then serve.

    The socket is bound before anything is said, so port 0 takes a free port and the address told is the real
    one. optuna-dashboard's run_server gives no way to learn the port, so its WSGI app runs on wsgiref here,
    the server run_server uses too.
    """
    from wsgiref.simple_server import WSGIServer, make_server

    from optuna_dashboard import wsgi

    bare = host.strip("[]")
    server_class = WSGIServer
    if ":" in bare:  # an IPv6 address
        server_class = type("WSGIServerIPv6", (WSGIServer,), {"address_family": socket.AF_INET6})
    with make_server(bare, port, wsgi(storage, artifact_store=store), server_class=server_class) as server:
        on_ready(f"http://{f'[{bare}]' if ':' in bare else bare}:{server.server_port}/")
        server.serve_forever()

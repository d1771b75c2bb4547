"""optuna-dashboard on the studies' storage, with the weights artifacts and the plots Optuna does not draw.

The dashboard already shows history, importances and parallel coordinates; what it lacks are the best
trial's learning curves and the test confusion matrix, saved on the study with its own custom-plot API.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore

from search.family import get_family
from search.studies import load_settings

CURVES_PLOT_ID = "best-trial-learning-curves"
CONFUSION_PLOT_ID = "test-confusion-matrix"


def save_dashboard_plots(study: optuna.Study, result: dict[str, Any]) -> None:
    """Store the tested trial's curves and the test confusion matrix as the study's custom dashboard plots.

    Fixed plot ids, so running `best` again replaces the plots instead of adding more.
    """
    from optuna_dashboard import save_plotly_graph_object

    from search.report.figures import confusion_figure, learning_curves

    title = get_family(load_settings(study).family).title
    trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id,
                                                                                          result["trial"]))
    history = trial.user_attrs.get("history", [])
    if history:
        figure = learning_curves(history, f"{title}: trial #{trial.number}, loss and accuracy per epoch")
        save_plotly_graph_object(study, figure, graph_object_id=CURVES_PLOT_ID)
    figure = confusion_figure(result, f"{title}: test confusion matrix (trial #{trial.number} retrained)")
    save_plotly_graph_object(study, figure, graph_object_id=CONFUSION_PLOT_ID)


def serve(storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore, host: str, port: int) -> None:
    """Run the dashboard until Ctrl-C (optuna-dashboard's own wsgiref server)."""
    from optuna_dashboard import run_server

    run_server(storage, host=host, port=port, artifact_store=store)

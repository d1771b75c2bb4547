"""Experiment trackers: each trial's params, per-epoch curves and outcome, and `best`'s tested result, sent to
MLflow, TensorBoard or Weights & Biases, where teams already compare runs.

A tracker is named on the command line as KIND or KIND:TARGET (`--track mlflow:./mlruns`, repeatable) and
registered here once, with its help text and the package its optional extra installs. Packages are imported
only when a tracker is opened, so the command line lists the kinds cheaply; a missing package is reported when
the command line is read (`parse_spec`), before any work starts.

Trackers are per process: every worker opens its own (a worker on another host may track elsewhere). They are
called through `Trackers`, where a failing tracker (a full disk, an unreachable server) logs one warning line
and is off until the next trial: a tracker never fails a trial. `replay` sends a study's stored trials and
result, so a finished study can be exported too (`stl10-search track`).

optuna-integration's MLflow, TensorBoard and W&B callbacks are not used: they are `study.optimize` callbacks
called once a trial has finished, with its sampled params and final value only (and TensorBoard's needs
TensorFlow); the trackers here log every epoch and every resolved parameter, from the worker's own loop.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import urlparse

from search.errors import UserError
from search.registry import Registry

if TYPE_CHECKING:
    import optuna

    from search.records import BestResult
    from search.training import EpochMetrics

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")  # EpochMetrics, by epoch


class Tracker:
    """What a tracker is told, in this order: per trial `trial_started`, `epoch` after each epoch and
    `trial_finished`; `best` once `best` has tested a study's best trial; `close` at the end of the process.

    `study` is the study's name; `state` is the trial's final Optuna state in lower case (complete, pruned, fail).
    A trial that failed before it started (its params did not validate) may be told `trial_finished` alone: a
    tracker ignores it.
    """

    package = ""  # the package the tracker's extra installs, checked for when the command line is read
    target_name = "TARGET"  # what KIND:TARGET names, for --help

    def __init__(self, target: str | None) -> None:
        self.target = target

    def trial_started(self, study: str, trial_number: int, params: dict[str, Any]) -> None:
        pass

    def epoch(self, study: str, trial_number: int, metrics: EpochMetrics) -> None:
        pass

    def trial_finished(self, study: str, trial_number: int, state: str, value: float | None,
                       reason: str | None) -> None:
        pass

    def best(self, study: str, result: BestResult, bundle_dir: Path | None = None) -> None:
        pass

    def close(self) -> None:
        pass


TRACKERS: Registry[Tracker] = Registry("tracker")


@dataclass(frozen=True)
class TrackerSpec:
    """One --track value: a registered kind and its target (a URI, folder or project), None for the default."""

    kind: str
    target: str | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}:{self.target}"


def parse_spec(text: str) -> TrackerSpec:
    """--track KIND[:TARGET] -> TrackerSpec; a UserError for an unknown kind or one whose package is missing."""
    kind, colon, target = text.strip().partition(":")
    TRACKERS.check(kind)
    if colon and not target.strip():
        raise UserError(f"--track {text!r}: give a target after ':', or leave out the ':'")
    require(kind)
    return TrackerSpec(kind, target.strip() or None)


def require(kind: str) -> None:
    """A UserError naming the extra to install when the package of tracker `kind` is not installed."""
    package = _tracker_class(kind).package
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--track {kind} needs the {package} package: pip install 'stl10-search[{kind}]'")


def describe() -> str:
    """The kinds with their targets, for --help: "mlflow[:URI]: ...; tensorboard[:DIR]: ..."."""
    return "; ".join(f"{entry.name}[:{_tracker_class(entry.name).target_name}]: {entry.help}"
                     for entry in TRACKERS.entries())


def open_trackers(specs: Iterable[TrackerSpec] | None, log: Callable[[str], None]) -> Trackers:
    """The trackers named on the command line (none: a Trackers that does nothing), each failure logged by `log`."""
    trackers = {}
    for spec in specs or []:
        require(spec.kind)
        trackers[str(spec)] = TRACKERS.create(spec.kind, spec.target)
    return Trackers(trackers, log)


class Trackers(Tracker):
    """The trackers of one process, told everything as one.

    A tracker that raises logs one warning line and is off until the next trial starts (or the next `best`):
    its run of this trial is incomplete anyway, and a server that does not answer then costs one timeout per
    trial, not one per epoch. An off tracker is still told `trial_finished` and `close`, quietly, so it ends
    what it can (a run's state, an open file). `failures` counts the warnings.
    """

    def __init__(self, trackers: dict[str, Tracker], log: Callable[[str], None]) -> None:
        """`trackers` by the --track value that named each; `log` takes the warning lines."""
        super().__init__(None)
        self.trackers, self.log = trackers, log
        self.failures = 0
        self._off: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def trial_started(self, study: str, trial_number: int, params: dict[str, Any]) -> None:
        self._off.clear()
        self._tell("trial_started", study, trial_number, params)

    def epoch(self, study: str, trial_number: int, metrics: EpochMetrics) -> None:
        self._tell("epoch", study, trial_number, metrics)

    def trial_finished(self, study: str, trial_number: int, state: str, value: float | None,
                       reason: str | None) -> None:
        self._tell("trial_finished", study, trial_number, state, value, reason, ending=True)

    def best(self, study: str, result: BestResult, bundle_dir: Path | None = None) -> None:
        """`bundle_dir` defaults to where `export` last wrote the result's bundle, if that folder is still there."""
        if bundle_dir is None and result.bundle and Path(result.bundle).is_dir():
            bundle_dir = Path(result.bundle)
        self._off.clear()
        self._tell("best", study, result, bundle_dir)

    def close(self) -> None:
        self._tell("close", ending=True)

    def _tell(self, method: str, *args: Any, ending: bool = False) -> None:
        """Call `method` on each tracker that is on; with `ending`, on the off ones too, their errors unlogged."""
        for name, tracker in self.trackers.items():
            off = name in self._off
            if off and not ending:
                continue
            try:
                getattr(tracker, method)(*args)
            except Exception as error:  # noqa: BLE001 - a tracker must never fail a trial
                if off:
                    continue
                self._off.add(name)
                self.failures += 1
                what = " ".join(str(error).split())[:200]
                self.log(f"warning: tracker {name} failed in {method} ({type(error).__name__}: {what}); "
                         "it is off until the next trial")


def replay(study: optuna.Study, trackers: Trackers) -> int:
    """Send a study's finished trials (params, curves, state, reason) and its tested best, as stored, to
    `trackers`, in trial order, as the worker and `best` would have. Returns the number of trials sent."""
    from search.records import BestResult, TrialRecord

    name, sent = study.study_name, 0
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not trial.state.is_finished():
            continue
        record = TrialRecord.load(trial)
        trackers.trial_started(name, trial.number, record.params_of(trial))
        for metrics in record.history:
            trackers.epoch(name, trial.number, metrics)
        trackers.trial_finished(name, trial.number, trial.state.name.lower(), trial.value, record.reason)
        sent += 1
    result = BestResult.load(study)
    if result is not None:
        trackers.best(name, result)
    return sent


def _tracker_class(kind: str) -> type[Tracker]:
    return {entry.name: entry.create for entry in TRACKERS.entries()}[TRACKERS.check(kind)]  # type: ignore[return-value]


def _scalar(value: Any) -> int | float | str | bool:
    """A parameter as trackers take it: numbers, strings and booleans as they are, anything else as JSON."""
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


def _best_metrics(result: BestResult) -> dict[str, float]:
    """The tested result's numbers, by the names every tracker logs them under."""
    values = {"test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
              "val_accuracy": result.val_accuracy, "retrained_val_accuracy": result.retrained_val_accuracy,
              "trainable_parameters": result.trainable_parameters,
              **{f"latency_ms_{batch}": ms for batch, ms in result.latency_ms.items()}}
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def _confusion(result: BestResult) -> dict[str, Any]:
    return {"classes": result.classes, "matrix": result.confusion_matrix, "rows": "true class",
            "columns": "predicted class", "per_class_accuracy": result.per_class_accuracy}


# MLflow's HTTP client retries a request for minutes by default; a tracker waits at most about a minute.
_MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@TRACKERS.register("mlflow", "an experiment per study, a run per trial and one for the tested best; URI: a "
                             "server, database or folder (default $MLFLOW_TRACKING_URI, else MLflow's own)")
class MlflowTracker(Tracker):
    """MLflow through its client API (no global active run). A folder is MLflow's file store, which MLflow 3
    refuses unless MLFLOW_ALLOW_FILE_STORE is set: naming a folder asks for it, so it is set here."""

    package = "mlflow"
    target_name = "URI"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        if target is not None and urlparse(target).scheme in ("", "file"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if target is not None and urlparse(target).scheme == "":  # a folder, named from the folder run in
            self.target = str(Path(target).expanduser().resolve())
        for name, value in _MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        import mlflow  # noqa: F401 - a missing package shows here, not at the first trial

        self._client: Any = None
        self._experiments: dict[str, str] = {}
        self._runs: dict[tuple[str, int], str] = {}

    def trial_started(self, study: str, trial_number: int, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self._start(study, f"trial-{trial_number}", {"stl10_search.trial": str(trial_number)})
        self._runs[(study, trial_number)] = run_id
        self._client.log_batch(run_id, params=[Param(k, str(_scalar(v))) for k, v in params.items()])

    def epoch(self, study: str, trial_number: int, metrics: EpochMetrics) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._runs[(study, trial_number)],
                               metrics=[Metric(name, float(getattr(metrics, name)), now, metrics.epoch)
                                        for name in EPOCH_METRICS])

    def trial_finished(self, study: str, trial_number: int, state: str, value: float | None,
                       reason: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._runs.pop((study, trial_number), None)
        if run_id is None:  # it failed before it started (invalid params), or its start failed here
            return
        metrics = [] if value is None else [Metric("value", float(value), int(time.time() * 1000), 0)]
        self._client.log_batch(run_id, metrics=metrics, tags=[RunTag("state", state), RunTag("reason", reason or "")])
        self._client.set_terminated(run_id, "FAILED" if state == "fail" else "FINISHED")

    def best(self, study: str, result: BestResult, bundle_dir: Path | None = None) -> None:
        from mlflow.entities import Metric, Param

        run_id = self._start(study, f"best (trial {result.trial})",
                             {"stl10_search.best": "true", "stl10_search.trial": str(result.trial)})
        now = int(time.time() * 1000)
        self._client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in _best_metrics(result).items()],
                               params=[Param(k, str(_scalar(v))) for k, v in result.params.items()])
        self._client.log_dict(run_id, _confusion(result), "confusion_matrix.json")
        self._client.log_dict(run_id, result.to_json(), "best_result.json")
        if bundle_dir is not None:
            self._client.log_artifacts(run_id, str(bundle_dir), "bundle")
        self._client.set_terminated(run_id, "FINISHED")

    def close(self) -> None:
        """Runs of trials that never finished here (the worker was stopped) end as killed."""
        while self._runs:
            self._client.set_terminated(self._runs.popitem()[1], "KILLED")

    def _start(self, study: str, run_name: str, tags: dict[str, str]) -> str:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.target)
        if study not in self._experiments:
            found = self._client.get_experiment_by_name(study)
            self._experiments[study] = found.experiment_id if found else self._create_experiment(study)
        run = self._client.create_run(self._experiments[study], run_name=run_name,
                                      tags={"stl10_search.study": study, **tags})
        return run.info.run_id

    def _create_experiment(self, study: str) -> str:
        """Workers starting together may both create the study's experiment: the second takes the first's."""
        from mlflow.exceptions import MlflowException

        try:
            return self._client.create_experiment(study)
        except MlflowException:
            found = self._client.get_experiment_by_name(study)
            if found is None:
                raise
            return found.experiment_id


@TRACKERS.register("tensorboard", "event files in DIR/STUDY/trial-N per trial and DIR/STUDY/best (default DIR "
                                  "./runs)")
class TensorBoardTracker(Tracker):
    """torch.utils.tensorboard's SummaryWriter, which needs the tensorboard package (not TensorFlow)."""

    package = "tensorboard"
    target_name = "DIR"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - a missing package shows here

        self.root = Path(target or "runs").expanduser().resolve()  # named from the folder run in
        self._writers: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}

    def trial_started(self, study: str, trial_number: int, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.root / study / f"trial-{trial_number}"))
        self._writers[(study, trial_number)] = (writer, params)

    def epoch(self, study: str, trial_number: int, metrics: EpochMetrics) -> None:
        writer, _ = self._writers[(study, trial_number)]
        for name in EPOCH_METRICS:
            writer.add_scalar(name, float(getattr(metrics, name)), metrics.epoch)
        writer.flush()

    def trial_finished(self, study: str, trial_number: int, state: str, value: float | None,
                       reason: str | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        if (study, trial_number) not in self._writers:  # it failed before it started, or its start failed here
            return
        writer, params = self._writers.pop((study, trial_number))
        try:
            # the HParams tab: this run's params and its value, written into the run's own folder (add_hparams
            # would open a second folder for them)
            for summary in hparams({k: _scalar(v) for k, v in params.items()}, {"value": value}):
                writer.file_writer.add_summary(summary)
            if value is not None:
                writer.add_scalar("value", float(value), 0)
            writer.add_text("state", state)
            writer.add_text("reason", reason or "")
        finally:
            writer.close()

    def best(self, study: str, result: BestResult, bundle_dir: Path | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(self.root / study / "best")) as writer:
            for name, value in _best_metrics(result).items():
                writer.add_scalar(name, value, 0)
            header = "| true \\ predicted | " + " | ".join(result.classes) + " |"
            rule = "|---" * (len(result.classes) + 1) + "|"
            rows = [f"| {c} | " + " | ".join(map(str, row)) + " |" for c, row in zip(result.classes, result.confusion_matrix)]
            writer.add_text("confusion_matrix", "\n".join([header, rule, *rows]))
            writer.add_text("params", json.dumps(result.params, indent=1))
            writer.add_text("trial", str(result.trial))
            if bundle_dir is not None:
                writer.add_text("bundle", str(bundle_dir))

    def close(self) -> None:
        while self._writers:
            self._writers.popitem()[1][0].close()


@TRACKERS.register("wandb", "a run per trial grouped by study, and one for the tested best; offline unless "
                            "WANDB_MODE says otherwise (default PROJECT stl10-search)")
class WandbTracker(Tracker):
    """W&B runs, one at a time per process; offline by default, so a worker never waits on a login or network."""

    package = "wandb"
    target_name = "PROJECT"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        import wandb  # noqa: F401 - a missing package shows here

        self._runs: dict[tuple[str, int], Any] = {}

    def trial_started(self, study: str, trial_number: int, params: dict[str, Any]) -> None:
        self._runs[(study, trial_number)] = self._init(study, f"{study}-trial-{trial_number}", "trial", params)

    def epoch(self, study: str, trial_number: int, metrics: EpochMetrics) -> None:
        self._runs[(study, trial_number)].log({name: float(getattr(metrics, name)) for name in EPOCH_METRICS},
                                              step=metrics.epoch)

    def trial_finished(self, study: str, trial_number: int, state: str, value: float | None,
                       reason: str | None) -> None:
        run = self._runs.pop((study, trial_number), None)
        if run is None:  # it failed before it started, or its start failed here
            return
        try:
            run.summary.update({"state": state, "reason": reason or "", **({} if value is None else {"value": value})})
        finally:
            run.finish(exit_code=1 if state == "fail" else 0)

    def best(self, study: str, result: BestResult, bundle_dir: Path | None = None) -> None:
        import wandb

        run = self._init(study, f"{study}-best", "best", result.params)
        try:
            run.summary.update({**_best_metrics(result), "trial": result.trial})
            run.log({"confusion_matrix": wandb.Table(columns=["true \\ predicted", *result.classes],
                                                     data=[[c, *row] for c, row in
                                                           zip(result.classes, result.confusion_matrix)])})
            if bundle_dir is not None:
                artifact = wandb.Artifact(f"{study}-bundle", type="model")
                artifact.add_dir(str(bundle_dir))
                run.log_artifact(artifact)
        finally:
            run.finish()

    def close(self) -> None:
        """Runs of trials that never finished here end as failed; then W&B's service stops, once it has written
        every run's files (a finished run's file may still be open until then)."""
        import wandb

        try:
            while self._runs:
                self._runs.popitem()[1].finish(exit_code=1)
        finally:
            wandb.teardown()

    def _init(self, study: str, name: str, job_type: str, config: dict[str, Any]) -> Any:
        import wandb

        return wandb.init(project=self.target or "stl10-search", group=study, name=name, job_type=job_type,
                          config={k: _scalar(v) for k, v in config.items()},
                          mode=os.environ.get("WANDB_MODE") or "offline", reinit="create_new",
                          settings=wandb.Settings(console="off", silent=True))

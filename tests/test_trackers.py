"""Experiment trackers (`--track`): what MLflow, TensorBoard and W&B hold after a study is sent to them, read back
with each tool's own reader; a missing package or a failing tracker as the user sees it."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from search.cli import build_parser, main
from search.errors import UserError
from search.records import BestResult, TrialRecord
from search.trackers import EPOCH_METRICS, TRACKERS, TrackerSpec, open_trackers, parse_spec, replay
from search.training import EpochMetrics
from test_records import v1_storage  # noqa: F401 - the fixture: a study written by release 0.1.0

MLFLOW_SETTINGS = ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                   "MLFLOW_TRACKING_URI")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MLflow setting from the environment, and whatever a tracker sets is undone after the test (setenv
    before delenv makes monkeypatch remember to remove it); W&B writes its offline runs under tmp_path."""
    for name in MLFLOW_SETTINGS:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# --- what each tracker's own reader sees ---------------------------------------------------------------------

def mlflow_runs(folder: Path, study: str) -> dict[Any, Any]:
    """{trial number: run, "best": run} of the study's experiment, through MlflowClient on the file store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=str(folder))
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id])
    return {("best" if r.data.tags.get("stl10_search.best") else int(r.data.tags["stl10_search.trial"])): r
            for r in runs}


def mlflow_history(folder: Path, run_id: str, metric: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=str(folder)).get_metric_history(run_id, metric)
    return sorted((m.step, m.value) for m in history)


def tensorboard_run(folder: Path) -> dict[str, Any]:
    """A run folder through TensorBoard's EventAccumulator: scalars by tag, text by tag, hparams."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    texts = {tag.removesuffix("/text_summary"): events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
             for tag in tags["tensors"]}
    hparams = {}
    if "_hparams_/session_start_info" in events.summary_metadata:
        content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
        values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        hparams = {name: getattr(value, value.WhichOneof("kind")) for name, value in values.items()}
    return {"scalars": scalars, "texts": texts, "hparams": hparams}


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file (run-ID.wandb), parsed by W&B's own protobuf `Record`.

    wandb 0.31 ships no Python reader for these files (its reader lives in the Go wandb-core), so the framing is
    read here: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC, length, type: 1 full, 2 first, 3 middle, 4 last), as in LevelDB's log format.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending, block = [], 7, b"", 32 * 1024
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # the block's tail is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def wandb_runs(folder: Path) -> dict[str, dict[str, Any]]:
    """{run name: {"project", "group", "config", "history" [{key: value}], "summary", "exit_code"}} of the offline
    runs under `folder`."""
    runs = {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"history": [], "summary": {}, "exit_code": None}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, project=record.run.project, group=record.run.run_group,
                           config={i.key: json.loads(i.value_json) for i in record.run.config.update
                                   if not i.key.startswith("_")})
            elif kind == "history":
                run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs[run["name"]] = run
    return runs


def _key(item: Any) -> str:
    """A history or summary item's key: `key`, or else the path `nested_key`."""
    return item.key or "/".join(item.nested_key)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def as_param(value: Any) -> Any:
    """A parameter as a tracker stores a number: a float (TensorBoard's hparams hold float64 only)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# --- the command line -------------------------------------------------------------------------------------------

def test_every_per_epoch_metric_is_tracked() -> None:
    assert set(EPOCH_METRICS) == {f.name for f in fields(EpochMetrics)} - {"epoch"}


def test_a_spec_is_a_registered_kind_and_an_optional_target() -> None:
    assert TRACKERS.names() == ("mlflow", "tensorboard", "wandb")
    assert parse_spec("mlflow") == TrackerSpec("mlflow", None)
    assert parse_spec("mlflow:http://127.0.0.1:5000") == TrackerSpec("mlflow", "http://127.0.0.1:5000")
    assert str(parse_spec("tensorboard:./tb")) == "tensorboard:./tb"
    with pytest.raises(UserError, match="unknown tracker 'neptune'; choose from mlflow, tensorboard, wandb"):
        parse_spec("neptune:x")
    with pytest.raises(UserError, match="give a target after ':'"):
        parse_spec("wandb:")


def test_commands_take_repeated_track_flags_and_the_launcher_passes_them_to_its_workers() -> None:
    from search.commands.options import search_request
    from search.services.searching import worker_arguments

    tracks = ["--track", "mlflow:./mlruns", "--track", "tensorboard:./tb"]
    for command in (["search"], ["run"], ["best"], ["worker", "--model", "logreg"], ["track"]):
        args = build_parser().parse_args([*command, *tracks])
        assert [str(s) for s in args.track] == ["mlflow:./mlruns", "tensorboard:./tb"], command
    extra = worker_arguments(search_request(build_parser().parse_args(["search", "--model", "logreg", *tracks])))
    assert extra[extra.index("--track"):] == tracks
    worker = build_parser().parse_args(["worker", "--model", "logreg", *extra])
    assert [str(s) for s in worker.track] == ["mlflow:./mlruns", "tensorboard:./tb"]
    assert build_parser().parse_args(["search"]).track is None


@pytest.mark.parametrize("kind", ["mlflow", "tensorboard", "wandb"])
def test_a_missing_package_is_one_line_naming_its_extra_before_any_work(kind: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, kind, None)  # what `import kind` and importlib see when it is not installed
    storage = tmp_path / "studies.db"
    code, out, err = run_cli(["search", "--model", "logreg", "--workers", "0", "--storage", f"sqlite:///{storage}",
                              "--track", f"{kind}:somewhere"])
    assert code == 2 and out == ""
    assert err == f"stl10-search: error: --track {kind} needs the {kind} package: pip install 'stl10-search[{kind}]'\n"
    assert not storage.exists()  # read with the command line, before any study was created
    with pytest.raises(UserError, match=rf"pip install 'stl10-search\[{kind}\]'"):
        open_trackers([TrackerSpec(kind, None)], print)


# --- a stored study, sent to each tracker -------------------------------------------------------------------

def test_a_study_replayed_into_mlflow_reads_back_with_mlflows_client(v1_storage: str, tmp_path: Path,  # noqa: F811
                                                                     clean_env: None) -> None:
    study = optuna.load_study(study_name="logreg", storage=v1_storage)
    stored = BestResult.load(study)
    stored.bundle = str(tmp_path / "bundle")  # as `export` records the folder it wrote
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "config.json").write_text("{}")
    stored.save(study)
    trackers = open_trackers([parse_spec(f"mlflow:{tmp_path / 'mlruns'}")], print)
    assert replay(study, trackers) == 10  # 9 complete or pruned, 1 interrupted; the queued one has not run
    trackers.close()
    assert trackers.failures == 0

    runs = mlflow_runs(tmp_path / "mlruns", "logreg")
    trials = finished_trials(study)
    assert set(runs) == {t.number for t in trials} | {"best"}
    assert {t.state.name for t in trials} == {"COMPLETE", "PRUNED", "FAIL"}
    for trial in trials:
        record, run = TrialRecord.load(trial), runs[trial.number]
        assert run.data.params == {k: str(v) for k, v in record.params_of(trial).items()}
        assert mlflow_history(tmp_path / "mlruns", run.info.run_id, "val_accuracy") == [
            (m.epoch, m.val_accuracy) for m in record.history]
        assert mlflow_history(tmp_path / "mlruns", run.info.run_id, "train_loss") == [
            (m.epoch, m.train_loss) for m in record.history]
        assert (run.data.tags["state"], run.data.tags["reason"]) == (trial.state.name.lower(), record.reason)
        assert run.data.metrics.get("value") == trial.value
        assert run.info.status == ("FAILED" if trial.state.name == "FAIL" else "FINISHED")

    from mlflow import MlflowClient

    result, best = BestResult.load(study), runs["best"]
    assert best.data.metrics["test_accuracy"] == result.test_accuracy
    assert best.data.metrics["latency_ms_batch_1"] == result.latency_ms["batch_1"]
    assert best.data.tags["stl10_search.trial"] == str(result.trial)
    client = MlflowClient(tracking_uri=str(tmp_path / "mlruns"))
    matrix = client.download_artifacts(best.info.run_id, "confusion_matrix.json", str(tmp_path))
    confusion = json.loads(Path(matrix).read_text())
    assert (confusion["classes"], confusion["matrix"]) == (result.classes, result.confusion_matrix)
    assert [a.path for a in client.list_artifacts(best.info.run_id, "bundle")] == ["bundle/config.json"]


def test_a_study_replayed_into_tensorboard_reads_back_with_its_event_accumulator(v1_storage: str,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    study = optuna.load_study(study_name="logreg", storage=v1_storage)
    trackers = open_trackers([parse_spec(f"tensorboard:{tmp_path / 'tb'}")], print)
    replay(study, trackers)
    trackers.close()
    assert trackers.failures == 0

    trials = finished_trials(study)
    assert sorted(p.name for p in (tmp_path / "tb" / "logreg").iterdir()) == sorted(
        [f"trial-{t.number}" for t in trials] + ["best"])
    for trial in trials:
        record, run = TrialRecord.load(trial), tensorboard_run(tmp_path / "tb" / "logreg" / f"trial-{trial.number}")
        assert run["scalars"]["val_accuracy"] == [(m.epoch, pytest.approx(m.val_accuracy)) for m in record.history]
        assert run["scalars"]["val_loss"] == [(m.epoch, pytest.approx(m.val_loss)) for m in record.history]
        assert run["hparams"] == {k: as_param(v) for k, v in record.params_of(trial).items()}
        assert run["texts"] == {"state": trial.state.name.lower(), "reason": record.reason}
        assert run["scalars"].get("value") == (None if trial.value is None else [(0, pytest.approx(trial.value))])

    result, best = BestResult.load(study), tensorboard_run(tmp_path / "tb" / "logreg" / "best")
    assert best["scalars"]["test_accuracy"] == [(0, pytest.approx(result.test_accuracy))]
    rows = best["texts"]["confusion_matrix"].splitlines()[2:]
    assert [[int(n) for n in row.strip("| ").split(" | ")[1:]] for row in rows] == result.confusion_matrix


def test_a_study_replayed_into_wandb_offline_reads_back_from_its_run_files(v1_storage: str,  # noqa: F811
                                                                           tmp_path: Path, clean_env: None) -> None:
    study = optuna.load_study(study_name="logreg", storage=v1_storage)
    trackers = open_trackers([parse_spec("wandb:stl10-test")], print)
    replay(study, trackers)
    trackers.close()
    assert trackers.failures == 0

    runs = wandb_runs(tmp_path)
    trials = finished_trials(study)
    assert set(runs) == {f"logreg-trial-{t.number}" for t in trials} | {"logreg-best"}
    for trial in trials:
        record, run = TrialRecord.load(trial), runs[f"logreg-trial-{trial.number}"]
        assert (run["project"], run["group"]) == ("stl10-test", "logreg")
        assert run["config"] == record.params_of(trial)
        assert [(h["_step"], h["val_accuracy"]) for h in run["history"]] == [
            (m.epoch, m.val_accuracy) for m in record.history]
        assert (run["summary"]["state"], run["summary"]["reason"]) == (trial.state.name.lower(), record.reason)
        assert run["summary"].get("value") == trial.value
        assert run["exit_code"] == (1 if trial.state.name == "FAIL" else 0)
    result = BestResult.load(study)
    assert runs["logreg-best"]["summary"]["test_accuracy"] == result.test_accuracy
    assert runs["logreg-best"]["config"] == result.params


# --- failures ------------------------------------------------------------------------------------------------

def test_a_failing_tracker_warns_once_per_trial_and_the_others_go_on(v1_storage: str, tmp_path: Path,  # noqa: F811
                                                                     clean_env: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable MLflow server and a TensorBoard folder that cannot be made (a file is in the way): each
    warns in one line per trial and is tried again at the next; the working tracker gets everything, and
    `track` exits 1."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    (tmp_path / "not-a-folder").write_text("")
    code, out, err = run_cli(["track", "--model", "logreg", "--storage", v1_storage,
                              "--track", "mlflow:http://127.0.0.1:9", "--track", f"tensorboard:{tmp_path / 'not-a-folder'}",
                              "--track", f"tensorboard:{tmp_path / 'tb'}"])
    assert code == 1
    assert out == f"logreg: 10 finished trial(s) and its tested best sent to mlflow:http://127.0.0.1:9, " \
                  f"tensorboard:{tmp_path / 'not-a-folder'}, tensorboard:{tmp_path / 'tb'}\n"
    warnings = err.splitlines()
    assert len(warnings) == 2 * 11  # two failing trackers, 10 trials and the best each
    assert all(w.startswith("warning: tracker ") and w.endswith("it is off until the next trial") for w in warnings)
    assert sum("tracker mlflow:http://127.0.0.1:9 failed in trial_started" in w for w in warnings) == 10
    assert sum("not-a-folder failed in trial_started" in w for w in warnings) == 10
    assert len(list((tmp_path / "tb" / "logreg").iterdir())) == 11


def test_a_tracker_that_fails_mid_trial_is_skipped_for_the_rest_of_it(tmp_path: Path, clean_env: None) -> None:
    """The MLflow store loses a running trial's run after epoch 1 (its folder removed, as by an unmounted disk):
    one warning, no more calls for that trial, and the next trial is tracked again."""
    import shutil

    lines: list[str] = []
    trackers = open_trackers([parse_spec(f"mlflow:{tmp_path / 'mlruns'}")], lines.append)
    epochs = [EpochMetrics(e, 1.0 / e, 0.5, 1.0, 0.5, 0.1) for e in (1, 2, 3)]
    trackers.trial_started("logreg", 0, {"lr": 0.1})
    trackers.epoch("logreg", 0, epochs[0])
    shutil.rmtree(Path(mlflow_runs(tmp_path / "mlruns", "logreg")[0].info.artifact_uri).parent)
    for metrics in epochs[1:]:
        trackers.epoch("logreg", 0, metrics)
    trackers.trial_finished("logreg", 0, "complete", 0.5, "completed 3 epochs")
    assert len(lines) == 1 and "tracker mlflow:" in lines[0] and " failed in epoch (" in lines[0]
    trackers.trial_started("logreg", 1, {"lr": 0.2})
    for metrics in epochs:
        trackers.epoch("logreg", 1, metrics)
    trackers.trial_finished("logreg", 1, "complete", 0.5, "completed 3 epochs")
    trackers.close()
    assert len(lines) == 1
    run = mlflow_runs(tmp_path / "mlruns", "logreg")[1]
    assert mlflow_history(tmp_path / "mlruns", run.info.run_id, "val_accuracy") == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert run.data.tags["state"] == "complete"


def test_a_trial_that_failed_before_it_started_is_ignored(tmp_path: Path, clean_env: None) -> None:
    """Invalid params fail a trial before the worker tells the trackers it started: its end alone is no error."""
    lines: list[str] = []
    trackers = open_trackers([parse_spec(f"mlflow:{tmp_path / 'mlruns'}"),
                              parse_spec(f"tensorboard:{tmp_path / 'tb'}"), parse_spec("wandb")], lines.append)
    trackers.trial_finished("logreg", 0, "fail", None, "invalid parameters: lr must be positive")
    trackers.close()
    assert (lines, trackers.failures) == ([], 0)
    assert not (tmp_path / "tb").exists() and not list(tmp_path.glob("wandb/offline-run-*"))


# --- the check: a 2-trial search and its best --------------------------------------------------------

def test_a_two_trial_search_and_its_best_read_back_in_mlflow_and_tensorboard(tiny_search, tmp_path: Path,
                                                                             clean_env: None,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`search` (2 trials on the tiny data), `best`, then `track --track mlflow:./mlruns --track tensorboard:./tb`
    from the folder: per-epoch validation accuracy, params and state of each trial, and the test accuracy."""
    from search.storage import open_storage
    from search.worker import work

    url = tiny_search.sqlite_url
    tiny_search.create(url, 2, "--pruner", "none")
    done = work(open_storage(url), ["logreg"], torch.device("cpu"), threading.Event(),
                data_overrides={"cache_dir": tiny_search.cache_dir}, log=lambda message: None)
    assert done == {"logreg": 2}
    code, _, err = run_cli(["best", "--model", "logreg", "--storage", url, "--cache-dir", str(tiny_search.cache_dir)])
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["track", "--model", "logreg", "--storage", url,
                              "--track", "mlflow:./mlruns", "--track", "tensorboard:./tb"])
    assert (code, err) == (0, "")
    assert out == "logreg: 2 finished trial(s) and its tested best sent to mlflow:./mlruns, tensorboard:./tb\n"

    assert_tracked(tmp_path, optuna.load_study(study_name="logreg", storage=url))


def assert_tracked(folder: Path, study: optuna.Study) -> None:
    """What MLflow's and TensorBoard's own readers list under FOLDER/mlruns and FOLDER/tb equals the study's
    records: each trial's per-epoch validation accuracy, params and state, and the tested best's test accuracy."""
    tmp_path = folder
    trials, result = finished_trials(study), BestResult.load(study)
    assert len(trials) == 2 and result is not None
    runs = mlflow_runs(tmp_path / "mlruns", "logreg")
    assert set(runs) == {0, 1, "best"}
    for trial in trials:
        record = TrialRecord.load(trial)
        assert len(record.history) == 2
        run = runs[trial.number]
        assert mlflow_history(tmp_path / "mlruns", run.info.run_id, "val_accuracy") == [
            (m.epoch, m.val_accuracy) for m in record.history]
        assert run.data.params == {k: str(v) for k, v in record.params_of(trial).items()}
        assert run.data.tags["state"] == "complete" and run.data.metrics["value"] == trial.value
        board = tensorboard_run(tmp_path / "tb" / "logreg" / f"trial-{trial.number}")
        assert board["scalars"]["val_accuracy"] == [(m.epoch, pytest.approx(m.val_accuracy)) for m in record.history]
        assert board["hparams"] == {k: as_param(v) for k, v in record.params_of(trial).items()}
        assert board["texts"]["state"] == "complete"
    assert runs["best"].data.metrics["test_accuracy"] == result.test_accuracy
    assert tensorboard_run(tmp_path / "tb" / "logreg" / "best")["scalars"]["test_accuracy"] == [
        (0, pytest.approx(result.test_accuracy))]


def test_a_worker_and_best_track_live_what_mlflow_and_tensorboard_then_list(tiny_search, tmp_path: Path,
                                                                            clean_env: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker sends each epoch as it ends, and `best --track` its result: no replay needed."""
    from search.storage import open_storage
    from search.worker import work

    monkeypatch.chdir(tmp_path)
    url = tiny_search.sqlite_url
    tiny_search.create(url, 2, "--pruner", "none")
    specs = [parse_spec("mlflow:./mlruns"), parse_spec("tensorboard:./tb")]
    trackers = open_trackers(specs, log=print)
    try:
        done = work(open_storage(url), ["logreg"], torch.device("cpu"), threading.Event(),
                    data_overrides={"cache_dir": tiny_search.cache_dir}, log=lambda message: None, trackers=trackers)
    finally:
        trackers.close()
    assert done == {"logreg": 2} and trackers.failures == 0
    code, _, err = run_cli(["best", "--model", "logreg", "--storage", url, "--cache-dir", str(tiny_search.cache_dir),
                            "--track", "mlflow:./mlruns", "--track", "tensorboard:./tb"])
    assert code == 0, err
    assert_tracked(tmp_path, optuna.load_study(study_name="logreg", storage=url))

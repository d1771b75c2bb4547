"""Trial packs in a search (search/worker.py): members asked for under the budget, each its own Optuna trial,
pruned inside its pack, queued again together when stopped, and reproduced alone by `best`."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search.family import get_family
from search.records import TrialRecord
from search.storage import open_storage
from search.trackers import Tracker
from search.worker import work

CPU = torch.device("cpu")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _records(trials) -> list[TrialRecord]:
    return [TrialRecord.load(t) for t in trials]


def _packs(trials) -> dict[int, list]:
    packs: dict[int, list] = defaultdict(list)
    for trial in trials:
        record = TrialRecord.load(trial)
        if record.pack_id is not None:
            packs[record.pack_id].append(trial)
    return dict(packs)


def test_members_count_against_the_budget_and_differ_only_in_member_parameters(tiny_search) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 6)
    done = work(open_storage(url), ["logreg"], CPU, threading.Event(),
                data_overrides={"cache_dir": tiny_search.cache_dir}, log=lambda line: None, pack=4)
    trials = tiny_search.trials(url)
    assert done == {"logreg": 6} and len(trials) == 6 and all(t.state in FINISHED for t in trials)
    packs = _packs(trials)
    assert sorted(len(members) for members in packs.values()) == [2, 4]  # 4, then the 2 the budget has left
    family = get_family("logreg")
    for leader_number, members in packs.items():
        records = _records(members)
        assert {r.pack_size for r in records} == {len(members)}
        assert {r.data_seed for r in records} == {TrialRecord.load(members[0]).seed}  # the leader's seed
        assert members[0].number == leader_number
        assert len({repr(sorted(family.pack_shared(r.params).items())) for r in records}) == 1
        assert len({r.params["lr"] for r in records}) == len(members)  # TPE still chose the rest
        assert len({r.seed for r in records}) == len(members)


class _StopAfterFirstEpoch(Tracker):
    def __init__(self, stop: threading.Event) -> None:
        super().__init__(None)
        self.stop = stop

    def epoch(self, study, trial_number, metrics) -> None:
        self.stop.set()


def test_a_stopped_pack_is_queued_again_together_and_resumes_from_its_checkpoint(tiny_search, tmp_path) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 3, "--param", "epochs=3", "--pruner", "none")
    checkpoints = tmp_path / "checkpoints"
    stop = threading.Event()
    work(open_storage(url), ["logreg"], CPU, stop, data_overrides={"cache_dir": tiny_search.cache_dir},
         log=lambda line: None, trackers=_StopAfterFirstEpoch(stop), pack=4, checkpoint_dir=checkpoints)
    trials = tiny_search.trials(url)
    assert Counter(t.state for t in trials) == {TrialState.FAIL: 3, TrialState.WAITING: 3}
    queued = [TrialRecord.load(t) for t in trials if t.state == TrialState.WAITING]
    assert {r.pack_id for r in queued} == {0} and {r.data_seed for r in queued} == {TrialRecord.load(trials[0]).seed}
    assert list(checkpoints.rglob("pack-0.pt"))

    done = work(open_storage(url), ["logreg"], CPU, threading.Event(),
                data_overrides={"cache_dir": tiny_search.cache_dir}, log=lambda line: None, pack=1,
                checkpoint_dir=checkpoints)  # a worker with --pack 1 still runs a stopped pack as the pack it was
    trials = tiny_search.trials(url)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done == {"logreg": 3} and len(finished) == 3
    records = _records(finished)
    assert {r.pack_id for r in records} == {0} and {r.pack_size for r in records} == {3}
    assert {r.resumed_after_epoch for r in records} == {1} and all(len(r.history) == 3 for r in records)
    assert {r.first_number for r in records} == {0, 1, 2}
    assert not list(checkpoints.rglob("pack-*.pt"))  # deleted once the pack ended


def test_queued_trials_run_alone(tiny_search) -> None:
    """The hand-found setting is queued first: it runs alone, then the sampled trials form packs."""
    url = tiny_search.sqlite_url
    tiny_search.create(url, 4, "--enqueue-reference")
    work(open_storage(url), ["logreg"], CPU, threading.Event(), data_overrides={"cache_dir": tiny_search.cache_dir},
         log=lambda line: None, pack=4)
    records = {t.number: TrialRecord.load(t) for t in tiny_search.trials(url)}
    assert records[0].reference and records[0].pack_id is None
    assert {records[n].pack_id for n in (1, 2, 3)} == {1}


@pytest.mark.parametrize("value, message", [("0", "at least 1"), ("four", "a number of trials or auto")])
def test_a_bad_pack_size_is_one_line(value: str, message: str, capsys) -> None:
    from search.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["search", "--model", "logreg", "--pack", value, "--workers", "0"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_search_says_how_many_trials_each_model_packs(tiny_search) -> None:
    from search.services.searching import describe_packs

    url = tiny_search.sqlite_url
    tiny_search.create(url, 2)
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    assert describe_packs(None, [study], "cpu").endswith("logreg 8")
    assert describe_packs(1, [study], "cpu").endswith("logreg 1")
    assert describe_packs(4, [study], "cuda").endswith("logreg up to 4")


@pytest.mark.slow
def test_a_two_worker_search_of_packs_meets_its_budget_prunes_inside_packs_and_best_reproduces_a_member(
        shared_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Issue 19's end-to-end check, on the shared CIFAR folder (real photos at STL-10's split sizes)."""
    from search.cli import main
    from search.pipeline import load_parts, place
    from search.studies import load_settings
    from search.trial import run_trial

    monkeypatch.chdir(tmp_path)
    root = shared_dir / "datasets" / "cifar10-stl10-sized"
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    data = ["--dataset", "imagefolder", "--data-root", str(root), "--image-size", "32",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(["search", "--model", "logreg", "--storage", url, "--n-trials", "16", "--workers", "2",
                 "--pack", "4", "--param", "epochs=3", "--pruner", "halving", "-q", *data]) == 0
    study = optuna.load_study(study_name="logreg", storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state in FINISHED for t in trials) == 16 and len(trials) == 16  # exactly the budget
    packs = _packs(trials)
    assert packs and all(len(members) <= 4 for members in packs.values())
    assert len({TrialRecord.load(t).worker for t in trials}) == 2
    pruned_beside_others = [
        t for members in packs.values() for t in members if t.state == TrialState.PRUNED
        and any(len(TrialRecord.load(o).history) > len(TrialRecord.load(t).history) for o in members)]
    assert pruned_beside_others, "no member was pruned while others of its pack went on"

    # a member that is not its pack's leader (its seed is not its data seed), retrained alone
    member = max((t for t in trials if t.state == TrialState.COMPLETE
                  and TrialRecord.load(t).pack_id not in (None, t.number)), key=lambda t: t.value)
    record = TrialRecord.load(member)
    assert record.seed != record.data_seed
    settings = load_settings(study)
    config = settings.data_config()
    parts = place(load_parts(config, 32), CPU)
    alone = run_trial(get_family("logreg"), record.params, parts, config, CPU, record.seed,
                      data_seed=record.data_seed)
    packed = [m.val_accuracy for m in record.history]
    retrained = [m.val_accuracy for m in alone.history]
    assert abs(retrained[0] - packed[0]) <= 0.005 and abs(retrained[-1] - packed[-1]) <= 0.01

    assert main(["best", "--model", "logreg", "--storage", url, "-q"]) == 0
    best = study.best_trial
    from search.records import BestResult

    result = BestResult.load(optuna.load_study(study_name="logreg", storage=open_storage(url)))
    assert result.trial == best.number and result.data_seed == TrialRecord.load(best).data_seed
    assert abs(result.retrained_val_accuracy - best.value) <= 0.01


def test_the_python_api_refuses_a_pack_size_below_one_as_the_command_line_does() -> None:
    from search.errors import UserError
    from search.services.searching import SearchRequest

    with pytest.raises(UserError, match="--pack must be at least 1"):
        SearchRequest(models=["logreg"], pack=0)

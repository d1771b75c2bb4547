"""Bring your own model: a family defined in a file outside the repository is searched, retrained and reported."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from conftest import REPO_ROOT
from search.errors import UserError
from search.family import families, get_family, load_family_file
from search.records import TrialRecord

TINY_FAMILY = '''
from torch import nn

from search.family import Family
from search.space import integer
from search.training import training_space


def build(params, num_classes, image_size, weights):
    channels = params["channels"]
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes))


TINY = Family(
    name="tinynet",
    title="tiny conv net",
    build=build,
    image_size=16,
    space=[integer("channels", 4, 16), *training_space(batch_sizes=(8, 16), epochs=2)],
    reference={"channels": 8, "batch_size": 8},
    n_trials=2,
)
'''


@pytest.fixture
def family_file(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "tiny_family.py"
    path.parent.mkdir()
    path.write_text(TINY_FAMILY)
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command line in a fresh process: nothing registered but what the process loads itself."""
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_a_family_file_is_searched_by_workers_then_retrained_and_reported(family_file: Path, tiny_imagefolder: Path,
                                                                          tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    data = ["--dataset", "imagefolder", "--data-root", str(tiny_imagefolder), "--cache-dir", str(tmp_path / "cache")]
    searched = _cli("search", "--model", "tinynet", "--family-file", str(family_file), "--n-trials", "2",
                    "--workers", "1", "--storage", url, "--log-dir", str(tmp_path / "logs"), *data, cwd=tmp_path)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert searched.returncode == 0, searched.stderr + logs
    trials = optuna.load_study(study_name="tinynet", storage=url).get_trials()
    assert sum(t.state.is_finished() for t in trials) == 2
    assert {TrialRecord.load(t).trainable_parameters for t in trials} <= {(3 * 9 + 1) * c + (c + 1) * 4 for c in range(4, 17)}

    tested = _cli("best", "--model", "tinynet", "--storage", url, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr  # no --family-file: the study names its file
    assert re.search(r"^tinynet: test accuracy [\d.]+%", tested.stdout, re.MULTILINE)

    reported = _cli("report", "--storage", url, "--out", str(tmp_path / "report"), "--format", "json,md",
                    cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (study,) = report["studies"]
    assert study["model"] == "tinynet" and study["title"] == "tiny conv net"
    assert study["best_result"]["test_accuracy"] is not None
    assert "tiny conv net" in (tmp_path / "report" / "report.md").read_text()


def test_a_family_file_registers_every_family_it_defines_with_its_space(family_file: Path) -> None:
    (name,) = load_family_file(family_file)
    family = get_family(name)
    assert name in families() and family.origin == str(family_file.resolve())
    params = family.resolve({"channels": 12})
    model = family.create_model(params, num_classes=4)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(UserError, match="channels must be between 4 and 16"):
        family.resolve({"channels": 100})


@pytest.mark.parametrize("content, message", [
    ("x = 1\n", "defines no Family"),
    ("raise RuntimeError('broken on purpose')\n", "failed to load: RuntimeError: broken on purpose"),
    (TINY_FAMILY.replace('name="tinynet"', 'name="cnn"'), "clashes with the one from built-in"),
])
def test_a_bad_family_file_is_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad_family.py"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as caught:
        load_family_file(path)
    assert "\n" not in str(caught.value)


def _readme_family() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    (block,) = [b for b in blocks if "Family(" in b]
    return block


def test_the_readme_resnet18_family_builds_and_searches_its_space(tmp_path: Path) -> None:
    """The README's own example: about 30 lines, registered like a built-in family."""
    path = tmp_path / "resnet18_family.py"
    path.write_text(_readme_family())
    assert len(_readme_family().strip().splitlines()) <= 35
    (name,) = load_family_file(path)
    family = get_family(name)
    model = family.create_model(family.resolve(), num_classes=10, weights="none")
    assert model.eval()(torch.zeros(2, 3, family.image_size, family.image_size)).shape == (2, 10)
    assert family.reference_trial(family.dims())  # --enqueue-reference has something to run


# --- a family is checked before it runs --------------------------------------------------------------------

BROKEN_FAMILIES = {
    "build raises": ('    channels = params["channels"]\n', "    raise KeyError('no such layer')\n",
                     "building the model failed: KeyError"),
    "forward raises": ("nn.Linear(channels, num_classes))", "nn.Linear(channels + 1, num_classes))",
                       "fails on a batch of 16x16 images: RuntimeError"),
    "wrong output width": ("nn.Linear(channels, num_classes))", "nn.Linear(channels, num_classes + 7))",
                           "outputs [2, 11] for a batch of 2, expected [2, 4]"),
}


@pytest.mark.parametrize("case", list(BROKEN_FAMILIES))
def test_a_family_that_cannot_build_or_run_its_model_stops_search_before_any_worker(
        case: str, tmp_path: Path, tiny_imagefolder: Path, capsys: pytest.CaptureFixture) -> None:
    old, new, message = BROKEN_FAMILIES[case]
    path = tmp_path / f"broken_{case.replace(' ', '_')}.py"
    path.write_text(TINY_FAMILY.replace(old, new).replace('name="tinynet"', f'name="broken{len(case)}"'))
    from search.cli import main

    code = main(["search", "--model", f"broken{len(case)}", "--family-file", str(path), "--n-trials", "2",
                 "--workers", "1", "--storage", f"sqlite:///{tmp_path / 'studies.db'}",
                 "--log-dir", str(tmp_path / "logs"), "--dataset", "imagefolder", "--data-root", str(tiny_imagefolder),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "studies.db").exists() and not (tmp_path / "logs").exists()  # nothing created or started


def test_a_trial_whose_setting_gives_the_wrong_output_width_fails_with_that_reason(tmp_path: Path, tiny_config) -> None:
    """The reference setting passes the check; a sampled width that adds outputs must not complete."""
    import threading

    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update, data_fields
    from search.worker import work

    path = tmp_path / "wide_family.py"
    path.write_text(TINY_FAMILY.replace("nn.Linear(channels, num_classes))",
                                        "nn.Linear(channels, num_classes + params['extra']))")
                    .replace('integer("channels", 4, 16)', 'integer("channels", 4, 16), integer("extra", 3, 3)')
                    .replace('name="tinynet"', 'name="widenet"'))
    load_family_file(path)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    storage = open_storage(url)
    create_or_update(storage, "widenet", StudySettings("widenet", 1, data=data_fields(tiny_config),
                                                       family_file=str(path)))
    work(storage, ["widenet"], torch.device("cpu"), threading.Event(), data_overrides={"cache_dir": tiny_config.cache_dir},
         log=lambda line: None)
    trial = optuna.load_study(study_name="widenet", storage=url).get_trials()[0]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert re.search(r"outputs \[(\d+), 7\] for a batch of \1, expected \[\1, 4\]", TrialRecord.load(trial).reason)


PRETRAINED_FAMILY = TINY_FAMILY.replace('''def build(params, num_classes, image_size, weights):
    channels = params["channels"]
    return''', '''def build(params, num_classes, image_size, weights):
    import torch

    channels = params["channels"]
    net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(channels, num_classes))
    if weights not in (None, "none"):
        stem = torch.load(weights, weights_only=True)
        net[0].weight.data[:len(stem["weight"])] = stem["weight"]
    return''').replace("    image_size=16,", "    image_size=16,\n    pretrained=True,")


def test_a_pretrained_family_file_loads_its_own_weights_file(tmp_path: Path, tiny_imagefolder: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """--weights goes to the family's builder as given: no MobileNetV2 loader in between."""
    path = tmp_path / "pretrained_family.py"
    path.write_text(PRETRAINED_FAMILY.replace('name="tinynet"', 'name="pretrainednet"'))
    weights = tmp_path / "own.pt"
    torch.save({"weight": torch.full((4, 3, 3, 3), 0.5)}, weights)
    from search.cli import main

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    code = main(["search", "--model", "pretrainednet", "--family-file", str(path), "--n-trials", "1", "--workers", "0",
                 "--storage", url, "--weights", str(weights), "--dataset", "imagefolder",
                 "--data-root", str(tiny_imagefolder), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    settings = optuna.load_study(study_name="pretrainednet", storage=url).user_attrs["settings"]
    assert settings["data"]["weights"] == str(weights.resolve())


def test_best_reports_a_family_that_fails_while_retraining_in_one_line(tmp_path: Path, tiny_config,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """The family worked during the search, then its file changed: `best` says where it broke, no traceback."""
    import threading

    from search.cli import main
    from search.storage import open_storage
    from search.studies import StudySettings, create_or_update, data_fields
    from search.worker import work

    path = tmp_path / "flaky_family.py"
    path.write_text(TINY_FAMILY.replace('name="tinynet"', 'name="flakynet"'))
    load_family_file(path)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    storage = open_storage(url)
    create_or_update(storage, "flakynet", StudySettings("flakynet", 1, data=data_fields(tiny_config),
                                                        family_file=str(path)))
    work(storage, ["flakynet"], torch.device("cpu"), threading.Event(),
         data_overrides={"cache_dir": tiny_config.cache_dir}, log=lambda line: None)
    family = get_family("flakynet")
    broken = family.build

    def build(params, num_classes, image_size, weights):
        model = broken(params, num_classes, image_size, weights)
        model.register_forward_hook(lambda module, args, output: (_ for _ in ()).throw(RuntimeError("bad layer")))
        return model

    object.__setattr__(family, "build", build)
    capsys.readouterr()
    code = main(["best", "--model", "flakynet", "--storage", url, "--cache-dir", str(tiny_config.cache_dir),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"retraining failed in model family flakynet ({path.resolve()}): RuntimeError: bad layer" in err
    assert "Traceback" not in err

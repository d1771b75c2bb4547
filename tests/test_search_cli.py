"""`stl10-search search` and `worker` on bad input: one clear line on stderr, exit code 2, nothing in storage."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import optuna
import pytest
import torchvision.datasets

from conftest import REPO_ROOT
from search.cli import main
from search.family import get_family


def _no_study_in(db: Path) -> bool:
    if not db.exists():
        return True
    return optuna.get_all_study_summaries(f"sqlite:///{db}", include_best_trial=False) == []


def _assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("stl10-search: error:"), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


@pytest.fixture
def search_args(tiny_search):
    """A `search` command line that would create a tiny logreg study in tmp_path, with no workers."""

    def args(*changes: str, model: str = "logreg", storage: str | None = None) -> list[str]:
        return ["search", "--model", model, "--workers", "0", "--n-trials", "2", "--param", "epochs=2",
                "--storage", storage or tiny_search.sqlite_url, *tiny_search.data_args(), *changes]

    return args


def _space_file(tmp_path: Path, content: str) -> str:
    path = tmp_path / "space.toml"
    path.write_text(content)
    return str(path)


def test_the_good_command_line_does_create_the_study(search_args, tmp_path: Path, capsys) -> None:
    """The baseline that every bad-input test below changes one thing of."""
    assert main(search_args()) == 0
    assert not _no_study_in(tmp_path / "studies.db")


@pytest.mark.parametrize("case, fragments", [
    ("unknown model", ["unknown model resnet", "choose from"]),
    ("malformed storage URL", ["malformed storage URL"]),
    ("unreachable database", ["cannot open storage", "postgresql://u:***@127.0.0.1:1/db"]),
    ("unknown parameter in the space file", ["unknown parameter learning_rate"]),
    ("empty range in the space file", ["logreg.lr: empty range"]),
    ("no trials", ["--n-trials must be at least 1"]),
    ("a GPU that does not exist", ["--gpus names GPU", "3", "does not exist"]),
    ("parameter of a model not searched", ["cnn is not among the models searched"]),
    ("image folder without its folder", ["--data-root DIR"]),
    ("an epoch budget of zero", ["logreg.epochs: must be between 1 and 10000, got 0"]),
    ("a negative epoch budget", ["logreg.epochs: must be between 1 and 10000, got -3"]),
    ("a layer wider than any memory", ["mlp.width_1: must be between 1 and 16384, got 1e+10"]),
    ("a range beyond what the code runs", ["logreg.flip_p: must be between 0 and 1, got 2"]),
])
def test_bad_search_input_is_one_line_exit_2_and_no_study(case: str, fragments: list[str], search_args,
                                                          tmp_path: Path, capsys) -> None:
    argv = {
        "unknown model": lambda: search_args(model="resnet"),
        "malformed storage URL": lambda: search_args(storage="postgresql://u:secret@host:port/db"),
        "unreachable database": lambda: search_args(storage="postgresql://u:secret@127.0.0.1:1/db"),
        "unknown parameter in the space file": lambda: search_args(
            "--space", _space_file(tmp_path, "[logreg]\nlearning_rate = 1e-3\n")),
        "empty range in the space file": lambda: search_args(
            "--space", _space_file(tmp_path, "[logreg]\nlr = {low = 1e-2, high = 1e-4}\n")),
        "no trials": lambda: search_args("--n-trials", "0"),
        "a GPU that does not exist": lambda: search_args("--gpus", "3"),
        "parameter of a model not searched": lambda: search_args("--param", "cnn.n_conv=2"),
        "an epoch budget of zero": lambda: search_args("--param", "epochs=0"),
        "a negative epoch budget": lambda: search_args("--param", "epochs=-3"),
        "a layer wider than any memory": lambda: search_args("--param", "width_1=1e10", model="mlp"),
        "a range beyond what the code runs": lambda: search_args("--param", "flip_p=0..2"),
        "image folder without its folder": lambda: [
            "search", "--model", "logreg", "--workers", "0", "--storage", f"sqlite:///{tmp_path / 'studies.db'}",
            "--dataset", "imagefolder"],
    }[case]()
    code = main(argv)
    err = capsys.readouterr().err
    _assert_clean_error(code, err, *fragments)
    assert "secret" not in err
    assert _no_study_in(tmp_path / "studies.db")


def test_worker_with_an_unreachable_database_is_a_clean_error(capsys) -> None:
    code = main(["worker", "--model", "logreg", "--storage", "postgresql://u:secret@127.0.0.1:1/db"])
    _assert_clean_error(code, capsys.readouterr().err, "cannot open storage")


def test_missing_data_is_found_before_the_storage_file_is_created(tmp_path: Path, capsys, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torchvision.datasets, "STL10", offline)
    code = main(["search", "--model", "logreg", "--workers", "0", "--storage", f"sqlite:///{tmp_path}/studies.db",
                 "--dataset", "stl10", "--data-root", str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "c")])
    _assert_clean_error(code, capsys.readouterr().err, "STL-10")
    assert not (tmp_path / "studies.db").exists()


def test_worker_for_a_study_that_does_not_exist_says_how_to_create_it(tmp_path: Path, capsys) -> None:
    code = main(["worker", "--model", "logreg", "--storage", f"sqlite:///{tmp_path}/studies.db"])
    _assert_clean_error(code, capsys.readouterr().err, "no study logreg", "--workers 0")
    assert _no_study_in(tmp_path / "studies.db")


@pytest.mark.parametrize("flag, value, fragments", [
    ("--n-trials", "many", ["--n-trials", "invalid int value"]),
    ("--sampler", "bayes", ["--sampler", "invalid choice: 'bayes'", "tpe", "random", "gp"]),
    ("--pruner", "early", ["--pruner", "invalid choice: 'early'", "hyperband", "median"]),
])
def test_a_bad_flag_value_is_an_argparse_error_with_exit_2(flag: str, value: str, fragments: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["search", flag, value])
    assert exited.value.code == 2
    _assert_clean_error(2, capsys.readouterr().err, *fragments)


def test_sampler_and_pruner_choices_and_help_come_from_their_registries(capsys) -> None:
    from search.sampling import PRUNERS, SAMPLERS

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for registry in (SAMPLERS, PRUNERS):
        assert "{" + ",".join(registry.names()) + "}" in text
        assert all(" ".join(entry.help.split()) in text for entry in registry.entries())


@pytest.mark.parametrize("prefix", ["../escape-", "runs/a-", "a/../../b"])
def test_a_study_prefix_that_could_leave_its_folders_is_refused(search_args, prefix: str, capsys) -> None:
    """The prefix names lock and checkpoint files too: no '/' and no '..'."""
    with pytest.raises(SystemExit) as exited:
        main(search_args("--study-prefix", prefix))
    assert exited.value.code == 2
    _assert_clean_error(2, capsys.readouterr().err, "--study-prefix", "no '/' and no '..'")


def test_bad_input_from_the_installed_command_is_one_line_without_traceback(tmp_path: Path) -> None:
    """The same through a real process: no warning or traceback printed around the error."""
    result = subprocess.run([sys.executable, "-m", "search.cli", "search", "--model", "logreg", "--workers", "0",
                             "--storage", "postgresql://u:secret@127.0.0.1:1/db"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
    assert "stl10-search: error: cannot open storage postgresql://u:***@127.0.0.1:1/db" in result.stderr


def test_help_imports_neither_torch_nor_optuna_nor_plotly() -> None:
    """--help of every command answers at once: the parser is built without the heavy packages."""
    code = ("import sys, contextlib, io\n"
            "from search.cli import build_parser, main\n"
            "for argv in (['--help'], ['search', '--help'], ['best', '--help'], ['run', '--help'], ['space', '--help'],\n"
            "             ['worker', '--help'], ['track', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        main(argv)\n"
            "print(sorted(m for m in ('torch', 'optuna', 'plotly', 'sqlalchemy', 'torchvision', 'mlflow', 'tensorboard',\n"
            "                         'wandb') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_and_the_model_list_in_help(capsys) -> None:
    import importlib.metadata

    from search.family import families

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"stl10-search {importlib.metadata.version('stl10-search')}"
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in families() if get_family(name).origin == "built-in")


def test_common_flags_take_their_defaults_from_the_environment(monkeypatch) -> None:
    from search.cli import build_parser

    monkeypatch.setenv("STL10_SEARCH_DEVICE", "cpu")
    monkeypatch.setenv("STL10_SEARCH_CACHE_DIR", "/tmp/cache-from-env")
    monkeypatch.setenv("STL10_SEARCH_DATA_ROOT", "/tmp/data-from-env")
    args = build_parser().parse_args(["best"])
    assert (args.device, str(args.cache_dir), str(args.data_root)) == ("cpu", "/tmp/cache-from-env", "/tmp/data-from-env")
    assert build_parser().parse_args(["best", "--device", "cuda:1"]).device == "cuda:1"  # a flag wins


COMMANDS = ["train --model logreg", "space", "search", "worker --model logreg", "best", "track --track tensorboard",
            "report", "dashboard", "export", "predict", "run"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_quiet_and_verbose(command: str) -> None:
    from search.cli import build_parser

    for flag, attribute in (("-q", "quiet"), ("--quiet", "quiet"), ("-v", "verbose"), ("--verbose", "verbose")):
        assert getattr(build_parser().parse_args([*command.split(), flag]), attribute) is True
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command.split(), "-q", "-v"])  # one or the other


def test_verbose_shows_the_traceback_behind_a_one_line_error(capsys) -> None:
    assert main(["best", "--storage", "postgresql://u:secret@host:port/db", "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("stl10-search: error:")
    assert main(["best", "--storage", "postgresql://u:secret@host:port/db"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_space_as_json_lists_every_parameter_of_each_model(capsys) -> None:
    import json

    assert main(["space", "--model", "logreg,cnn", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in models] == ["logreg", "cnn"]
    lr = next(p for p in models[0]["parameters"] if p["parameter"] == "lr")
    assert (lr["low"], lr["high"], lr["log"], lr["reference"]) == (1e-5, 3e-2, True, 1e-4)
    optimizer = next(p for p in models[1]["parameters"] if p["parameter"] == "optimizer")
    assert optimizer["choices"] == ["adam", "adamw", "sgd", "rmsprop"] and not optimizer["conditional"]
    assert next(p for p in models[1]["parameters"] if p["parameter"] == "channels_4")["conditional"]


def test_a_completion_script_for_bash_names_the_commands_and_their_flags(capsys) -> None:
    pytest.importorskip("shtab")
    with pytest.raises(SystemExit) as exited:
        main(["--print-completion", "bash"])
    script = capsys.readouterr().out
    assert exited.value.code == 0 and "complete" in script
    assert all(word in script for word in ("search", "best", "--model", "--time-budget", "--track"))

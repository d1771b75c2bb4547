"""`stl10-search train`: a hand-set run prints its table; every bad input is one error line and exit code 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from search.cli import main

ERROR_PREFIX = "stl10-search: error:"


def _train_argv(data_root: Path, cache_dir: Path, *extra: str, model: str = "cnn") -> list[str]:
    return [
        "train", "--model", model, "--dataset", "imagefolder", "--data-root", str(data_root),
        "--image-size", "32", "--epochs", "2", "--device", "cpu", "--cache-dir", str(cache_dir), *extra,
    ]  # fmt: skip


def _epoch_rows(out: str) -> list[int]:
    """Epoch numbers of the per-epoch table: rows that start with an integer and end with a time."""
    return [int(line.split()[0]) for line in out.splitlines() if re.fullmatch(r"\s*\d+\s+.*\d+\.\d+s", line)]


def test_train_prints_parameters_and_a_row_per_epoch(
    tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_train_argv(tiny_imagefolder, tmp_path))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _epoch_rows(out) == [1, 2]
    assert re.search(r"^CNN: [\d,]+ trainable parameters$", out, re.MULTILINE)
    assert re.search(r"^epoch\s+train loss\s+train acc\s+val loss\s+val acc\s+time$", out, re.MULTILINE)
    assert "test:" not in out
    assert "Traceback" not in err


def test_train_with_test_prints_test_accuracy(
    tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_train_argv(tiny_imagefolder, tmp_path, "--test", "--param", "batch_size=16"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _epoch_rows(out) == [1, 2]
    assert re.search(r"^test: loss \d+\.\d{4}, accuracy \d+\.\d\d% \(24 images\)$", out, re.MULTILINE)


def test_train_frozen_mobilenet_with_random_weights(
    tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _train_argv(tiny_imagefolder, tmp_path, "--weights", "none", "--param", "fc1=16", "--param", "fc2=8",
                       "--param", "feature_views=1", model="mobilenet_frozen")
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert _epoch_rows(out) == [1, 2]
    head_parameters = 1280 * 16 + 16 + 16 * 8 + 8 + 8 * 4 + 4
    assert f"frozen MobileNetV2: {head_parameters:,} trainable parameters" in out


_BAD_INPUTS = {
    "unknown model": (["--model", "resnet"], "unknown model"),
    "unknown parameter": (["--param", "foo=1"], "unknown parameter foo"),
    "parameter without value": (["--param", "lr"], "key=value"),
    "dropout out of range": (["--param", "dropout=1.5"], "dropout"),
    "negative learning rate": (["--param", "lr=-1"], "lr"),
    "non-integer width": (["--param", "fc1=12.5"], "fc1"),
    "unknown optimizer": (["--param", "optimizer=lbfgs"], "optimizer"),
    "zero epochs": (["--epochs", "0"], "epochs"),
    "non-integer epochs": (["--epochs", "two"], "--epochs"),
    "unknown device": (["--device", "tpu"], "device"),
    "image size too small": (["--image-size", "2"], "image-size"),
    "unknown flag": (["--epochz", "3"], "unrecognized arguments"),
    "missing data folder": (["--data-root", "{tmp}/no-such-folder"], "no-such-folder"),
    "missing weights file": (["--model", "mobilenet_frozen", "--weights", "/nonexistent.pth"], "/nonexistent.pth"),
}

def _run_bad(name: str, tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args, _ = _BAD_INPUTS[name]
    argv = _train_argv(tiny_imagefolder, tmp_path / "cache") + [arg.format(tmp=tmp_path) for arg in args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse exits instead of returning
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(_BAD_INPUTS))
def test_bad_input_exits_2_with_an_error_line_and_no_traceback(
    name: str, tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run_bad(name, tiny_imagefolder, tmp_path, capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, err
    assert err.splitlines()[-1] == errors[0]
    assert _BAD_INPUTS[name][1] in errors[0]
    assert "Traceback" not in err and "Traceback" not in out
    assert _epoch_rows(out) == []


@pytest.mark.parametrize("name", list(_BAD_INPUTS))
def test_bad_input_is_caught_before_loading_data(
    name: str, tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exactly one line on stderr, the error: a mistake costs no wait for the dataset to load."""
    code, out, err = _run_bad(name, tiny_imagefolder, tmp_path, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(ERROR_PREFIX)
    assert out == ""


def test_diverged_run_says_so_without_a_traceback(
    tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _train_argv(tiny_imagefolder, tmp_path, "--epochs", "5", "--param", "optimizer=sgd", "--param", "lr=10",
                       "--param", "momentum=0", "--param", "batch_size=8")
    try:
        code = main(argv)
    except Exception as error:  # noqa: BLE001 - an exception must not leave main()
        pytest.fail(f"main() raised {error!r}")
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    assert re.match(r"stl10-search: .*diverged at epoch (\d+)", err.splitlines()[-1])
    epoch = int(re.search(r"diverged at epoch (\d+)", err).group(1))
    assert _epoch_rows(out) == list(range(1, epoch))


def test_space_lists_each_parameter_with_its_range_reference_and_condition(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["space", "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert rows["channels_3"][1:3] == ["6..160", "(log)"] and rows["channels_3"][3] == "42"  # the study's 12/12/42
    assert rows["channels_4"][-1] == "(conditional)"  # only in a net of 4 blocks
    assert rows["lr_schedule"][1] == "{constant," and rows["epochs"][1:3] == ["60", "40"]
    assert "cnn: CNN (built-in; default budget 30 trials)" in out

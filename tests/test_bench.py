"""The benchmarks' own logic: what they fix and pass through, their options, and that nothing they start outlives them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import bench.trial_cost
from bench.search_quality import model_params
from bench.search_throughput import GpuSampler, fixed_params
from bench.trial_cost import cudnn_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO_ROOT / "bench" / "gpu_check.sh"


def test_throughput_trials_fix_the_work_and_search_only_lr_decay_dropout():
    params = dict(p.split("=", 1) for p in fixed_params("cnn", 3))
    assert params["epochs"] == "3" and params["batch_size"] == "64" and params["channels_3"] == "42"
    assert not {"lr", "weight_decay", "dropout", "image_size"} & set(params)


def test_quality_params_reach_only_the_models_that_have_them_and_the_users_come_last():
    given = ["epochs=5", "feature_views=1", "mlp.n_layers=3", "logreg.lr=0.01"]
    assert model_params("logreg", ["epochs=10"], given) == ["epochs=5", "logreg.lr=0.01"]
    assert model_params("mobilenet_frozen", [], given) == ["epochs=5", "feature_views=1"]


def test_cudnn_settings_on_cuda_only():
    assert cudnn_settings(None, torch.device("cpu")) == [None]
    assert cudnn_settings("on,off", torch.device("cuda")) == [True, False]
    with pytest.raises(SystemExit):
        cudnn_settings("on,off", torch.device("cpu"))
    with pytest.raises(SystemExit):
        cudnn_settings("maybe", torch.device("cuda"))


def _last(command: list[str], option: str) -> str:
    """The value of the last `option` in `command`, the one argparse keeps."""
    return command[len(command) - command[::-1].index(option)]


def test_each_cudnn_setting_is_measured_in_a_process_of_its_own(tmp_path, monkeypatch, capsys):
    """In one process "off" reused the plans "on" had tuned: cuDNN v8 reads its plan cache before the flag."""
    monkeypatch.setattr(bench.trial_cost, "resolve_device", lambda name: torch.device("cuda"))
    started: list[list[str]] = []

    def child(command: list[str]) -> subprocess.CompletedProcess:
        started.append(command)
        setting = _last(command, "--cudnn-benchmark")
        rows = [[name, "3", "64", "-" if name == "logreg" else setting, "1.0", "0.5", "-", "-", "2.0", "4.0x"]
                for name in _last(command, "--models").split(",")]
        Path(_last(command, "--rows-out")).write_text(json.dumps(
            {"rows": rows, "notes": [], "sizes": {"64": "64px: 140 train / 60 val"}, "threads": 1}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.trial_cost.subprocess, "run", child)
    bench.trial_cost.main(["--device", "cuda", "--models", "logreg,cnn", "--cudnn-benchmark", "on,off",
                           "--data-root", str(tmp_path), "--repeats", "1"])
    assert [_last(c, "--cudnn-benchmark") for c in started] == ["on", "off"]  # one process per setting
    assert [_last(c, "--models") for c in started] == ["logreg,cnn", "cnn"]  # no convolutions: measured once
    assert all(c[:3] == [sys.executable, "-m", "bench.trial_cost"] for c in started)
    table = capsys.readouterr().out.split("\n-")[1].splitlines()[1:]
    assert [line.split("|")[0].strip() + " " + line.split("|")[3].strip() for line in table if "|" in line] == [
        "logreg -", "cnn on", "cnn off"]


def test_a_process_for_one_setting_writes_its_rows_for_the_parent(tiny_imagefolder, tmp_path, capsys):
    rows = tmp_path / "rows.json"
    bench.trial_cost.main(["--device", "cpu", "--models", "logreg", "--images", "16", "--epochs", "1", "--repeats",
                           "1", "--threads", "1", "--data-root", str(tiny_imagefolder), "--rows-out", str(rows)])
    measured = json.loads(rows.read_text())
    assert [row[:3] for row in measured["rows"]] == [["logreg", "1", "64"]]
    assert measured["threads"] == 1 and "ratio" not in capsys.readouterr().out  # the parent prints the table


def test_gpu_sampler_reads_samples_and_ends_its_child(tmp_path):
    sampler = GpuSampler(0, 50, tmp_path / "samples.csv")
    sampler.command = [sys.executable, "-u", "-c",
                       "import time\nwhile True:\n    print('40, 1000', flush=True); time.sleep(0.02)"]
    with sampler:
        deadline = time.monotonic() + 120  # a hang guard, not a speed bound
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sampler.process.poll() is not None, "the sampler's child must be ended on leaving the block"
    assert sampler.busy(None) == (40.0, 1000.0)
    assert "40, 1000" in (tmp_path / "samples.csv").read_text()


def test_gpu_check_rejects_a_bad_device_at_once():
    result = subprocess.run(["bash", str(GPU_CHECK), "--device", "tpu"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cuda or cpu" in result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and nvidia-smi")
def test_nvidia_smi_sampler_on_a_gpu():
    with GpuSampler(0, 100) as sampler:
        torch.randn(4096, 4096, device="cuda").matmul(torch.randn(4096, 4096, device="cuda")).sum().item()
        time.sleep(1.0)
    assert sampler.error is None and sampler.samples
    assert sampler.process.poll() is not None


def _listed_wheels() -> list[str]:
    """The wheels gpu_check.sh's header says a box with only PyTorch and torchvision needs."""
    return [name for line in GPU_CHECK.read_text().splitlines() if line.startswith("#   wheels:")
            for name in line.split(":", 1)[1].split()]


def _with_requirements(names: list[str]) -> set[str]:
    """The installed distributions `names`, with everything they require (extras left out), as pip installs them."""
    found: set[str] = set()
    pending = list(names)
    while pending:
        name = canonicalize_name(pending.pop())
        if name not in found:
            found.add(name)
            requirements = [Requirement(text) for text in distribution(name).requires or []]
            pending += [r.name for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    return found


def _link_distribution(name: str, folder: Path) -> None:
    """Links in `folder` to each top-level module and metadata folder of an installed distribution."""
    files = distribution(name).files or []
    for top in sorted({file.parts[0] for file in files} - {"..", "__pycache__"}):
        if not top.endswith(".pth") and not (folder / top).exists():
            (folder / top).symlink_to(Path(distribution(name).locate_file(top)))


@pytest.mark.gpu_box
def test_gpu_check_runs_with_only_torch_torchvision_and_the_wheels_its_header_lists(tiny_imagefolder, tmp_path):
    """As on a GPU box prepared by gpu-prep.sh: pytest needs Pygments, plotly narwhals; without them `pytest -m cuda`
    ran nothing, and `best` and `report` crashed."""
    wheels = _listed_wheels()
    assert {"pytest", "Pygments", "narwhals", "PyYAML", "optuna"} <= set(wheels)
    site = tmp_path / "site"
    site.mkdir()
    for name in sorted(_with_requirements(["torch", "torchvision"]) | {canonicalize_name(w) for w in wheels}):
        _link_distribution(name, site)
    venv = tmp_path / "venv"  # no site-packages of its own; the workers the check starts run this python too
    subprocess.run([str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "STL10_SEARCH_"))}
    env["PYTHONPATH"] = str(site)
    python = str(venv / "bin" / "python")
    unlisted = subprocess.run([python, "-c", "import scipy"], env=env, capture_output=True, text=True)
    assert "No module named 'scipy'" in unlisted.stderr  # installed here, but not for the check
    result = subprocess.run(["bash", str(GPU_CHECK), "--device", "cpu", "--python", python,
                             "--data-root", str(tiny_imagefolder), "--out", str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "all steps passed" in result.stdout


def test_pack_bench_members_differ_as_a_searchs_trials_and_share_the_rest():
    from bench.trial_packs import members_of
    from search.family import get_family

    for name in ("logreg", "mlp", "cnn", "mobilenet_frozen"):
        family = get_family(name)
        base = family.resolve({"epochs": 2})
        members = members_of(family, base, 8)
        assert {m.params["optimizer"] for m in members} == {"adam", "adamw", "sgd", "rmsprop"}
        assert len({m.params["lr"] for m in members}) > 3 and len({m.seed for m in members}) == 8
        assert all(family.pack_shared(m.params) == family.pack_shared(members[0].params) for m in members)


def test_pack_bench_prints_a_table_per_family_and_the_step_comparison(tiny_imagefolder, monkeypatch, capsys):
    from bench import trial_packs

    monkeypatch.setattr(sys, "argv", ["trial_packs", "--data-root", str(tiny_imagefolder), "--models", "logreg,mlp",
                                      "--packs", "1,2", "--images", "16", "--epochs", "1", "--image-size", "8",
                                      "--step-repeats", "1", "--no-processes"])
    trial_packs.main()
    out = capsys.readouterr().out
    assert "logistic regression (logreg)" in out and "fully connected net (mlp)" in out
    assert out.count("ratio pack/solo") == 2
    step_rows = [line for line in out.splitlines() if line.startswith(("logreg ", "mlp "))]
    assert len(step_rows) == 4 and not any("failed" in row for row in step_rows)


@pytest.mark.slow
def test_pack_bench_runs_k_worker_processes_and_reports_a_failed_one(tiny_imagefolder, tmp_path):
    """The K-processes column (on by default on CUDA): K spawned processes start together; one that fails
    ends the measurement with its error instead of leaving the others waiting at the start."""
    import argparse

    from bench.trial_packs import members_of, time_processes
    from search.family import get_family

    family = get_family("logreg")
    args = argparse.Namespace(data_root=tiny_imagefolder, weights=None, images=16, seed=0, threads=1, device="cpu",
                              image_size=8, image_cache=str(tmp_path / "images"), feature_cache=str(tmp_path / "f"))
    members = members_of(family, family.resolve({"epochs": 1, "batch_size": 8}), 2)
    seconds, peak = time_processes(args, family, members)
    assert seconds > 0 and peak == 0  # no GPU memory on the CPU
    members[1].params["batch_size"] = 0  # this process's trial fails
    with pytest.raises(SystemExit, match="a worker process failed: ValueError"):
        time_processes(args, family, members)


@pytest.mark.slow
def test_the_large_study_benchmark_prints_a_row_per_size(tmp_path, capsys) -> None:
    import bench.large_study

    bench.large_study.main(["--sizes", "3,12", "--more", "1", "--work-dir", str(tmp_path)])
    table = capsys.readouterr().out.split("\n-")[1].splitlines()[1:]
    assert [line.split("|")[0].strip() for line in table if "|" in line] == ["3", "12"]

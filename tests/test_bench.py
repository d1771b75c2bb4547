"""The benchmarks' own logic: what they fix and pass through, their options, and that nothing they start outlives them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.search_quality import model_params
from bench.search_throughput import GpuSampler, fixed_params
from bench.trial_cost import cudnn_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def test_gpu_sampler_reads_samples_and_ends_its_child(tmp_path):
    sampler = GpuSampler(0, 50, tmp_path / "samples.csv")
    sampler.command = [sys.executable, "-u", "-c",
                       "import time\nwhile True:\n    print('40, 1000', flush=True); time.sleep(0.02)"]
    with sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sampler.process.poll() is not None, "the sampler's child must be ended on leaving the block"
    assert sampler.busy(None) == (40.0, 1000.0)
    assert "40, 1000" in (tmp_path / "samples.csv").read_text()


def test_gpu_check_rejects_a_bad_device_at_once():
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--device", "tpu"],
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

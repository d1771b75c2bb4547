"""The CUDA path: `train`, a 2-worker `search`, `best` and the feature cache on a GPU, with mixed precision
(`search.training.autocast_dtype`) and channels-last. Run with `pytest -m cuda` on a GPU box (bench/gpu_check.sh
does); skipped where there is no GPU.

STL10_SEARCH_CUDA_TESTS_ON_CPU=1 runs the same tests on the CPU (no autocast there), to check the tests
themselves on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

import search.features
import search.trial
import search.worker
from data import TrainSampler, normalize
from search.cli import main
from search.family import get_family
from search.features import FeatureBatches
from search.pipeline import Augmentation, ImageBatches, load_parts, place
from search.storage import open_storage
from search.training import autocast_dtype
from search.trial import Checkpoint, Interrupted, run_trial
from search.worker import work
from search.records import TrialRecord

ON_CPU = os.environ.get("STL10_SEARCH_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU")]
CHANCE = 0.25  # the tiny dataset has 4 classes
MOBILENET_WEIGHTS = "mobilenet_v2_imagenet_coral.pth"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cpu") if ON_CPU else torch.device("cuda:0")


def _conv_inputs(model: nn.Module) -> list[tuple[torch.dtype, bool, str]]:
    """Records (output dtype, input channels-last, device) of every call of the first convolution."""
    seen: list[tuple[torch.dtype, bool, str]] = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))

    def record(module, inputs, output):
        x = inputs[0]
        seen.append((output.dtype, x.is_contiguous(memory_format=torch.channels_last), x.device.type))

    conv.register_forward_hook(record)
    return seen


def test_cnn_trains_above_chance_with_mixed_precision_and_channels_last(tiny_config, device) -> None:
    family = get_family("cnn")
    params = family.resolve({"epochs": 4, "batch_size": 16, "lr": 3e-3})
    parts = place(load_parts(tiny_config, 32), device)
    seen: list = []
    fit = run_trial(family, params, parts, tiny_config, device, 0,
                    on_start=lambda model, source: seen.append(_conv_inputs(model)))
    inputs = seen[0]
    assert inputs and all(channels_last and kind == device.type for _, channels_last, kind in inputs)
    if device.type == "cuda":
        assert {dtype for dtype, _, _ in inputs} == {autocast_dtype(device) or torch.float32}
        assert next(fit.model.parameters()).is_cuda
    assert max(m.val_accuracy for m in fit.history) > CHANCE + 0.25
    assert fit.evaluate("val", device).accuracy == pytest.approx(fit.history[-1].val_accuracy)


def test_train_command_on_the_device(tiny_imagefolder: Path, tmp_path: Path, device, capsys) -> None:
    code = main(["train", "--model", "cnn", "--dataset", "imagefolder", "--data-root", str(tiny_imagefolder),
                 "--image-size", "32", "--epochs", "3", "--device", str(device), "--cache-dir", str(tmp_path),
                 "--param", "batch_size=16", "--test"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"device {device}" in err
    accuracy = float(re.search(r"^test: loss [\d.]+, accuracy ([\d.]+)%", out, re.MULTILINE).group(1)) / 100
    assert accuracy > CHANCE


def test_two_workers_on_one_gpu_share_the_budget_exactly_and_best_tests_on_it(tiny_search, tmp_path: Path,
                                                                              device, capsys) -> None:
    url = tiny_search.sqlite_url
    launch = ["--gpus", "0", "--workers-per-gpu", "2"] if device.type == "cuda" else ["--workers", "2"]
    code = main(["search", "--model", "cnn", "--n-trials", "6", "--storage", url, "--param", "epochs=3",
                 "--param", "batch_size=16", "--log-dir", str(tmp_path / "logs"), *launch, *tiny_search.data_args()])
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert code == 0, capsys.readouterr().err + logs
    trials = tiny_search.trials(url, "cnn")
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 6
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    assert {TrialRecord.load(t).device for t in trials} == {"cuda:0" if device.type == "cuda" else "cpu"}
    assert len({TrialRecord.load(t).worker for t in trials}) == 2  # both workers took trials
    assert "out of memory" not in logs.lower() and "Traceback" not in logs

    assert main(["best", "--model", "cnn", "--storage", url, "--device", str(device),
                 "--cache-dir", str(tiny_search.cache_dir)]) == 0
    result = optuna.load_study(study_name="cnn", storage=open_storage(url)).user_attrs["best_result"]
    assert result["device"] == str(device)
    assert result["test_accuracy"] > CHANCE
    assert 0 < result["latency_ms"]["batch_256"] <= result["latency_ms"]["batch_1"]


@pytest.fixture
def mobilenet_weights(request: pytest.FixtureRequest) -> Path:
    """The ImageNet MobileNetV2 weights: $STL10_SEARCH_BENCH_WEIGHTS (bench/gpu_check.sh sets it from --weights,
    since ../shared does not travel to a GPU box), else the shared file."""
    given = os.environ.get("STL10_SEARCH_BENCH_WEIGHTS")
    path = Path(given) if given else request.getfixturevalue("shared_dir") / "weights" / MOBILENET_WEIGHTS
    if not path.is_file():
        pytest.skip(f"no MobileNetV2 weights at {path}")
    return path


def _agree(features: torch.Tensor, reference: torch.Tensor, tolerance: float = 0.05) -> bool:
    """Within `tolerance` of the reference, relative to its size: bf16 features of the ImageNet backbone were 1-2%
    off fp32 ones on the CPU; zeros are 100% off."""
    return bool((features - reference).norm() <= tolerance * reference.norm())


def test_frozen_backbone_features_are_computed_once_on_the_device_and_then_read(tiny_config, device, monkeypatch,
                                                                                feature_computations,
                                                                                mobilenet_weights) -> None:
    """With the real weights: random ones give features of about 1e-9, which any tolerance with slack accepts."""
    calls = feature_computations
    config = dataclasses.replace(tiny_config, weights=str(mobilenet_weights))
    family = get_family("mobilenet_frozen")
    params = family.resolve({"fc1": 32, "fc2": 16, "feature_views": 2, "epochs": 3, "batch_size": 16, "lr": 3e-3,
                             "image_size": 32})
    parts = place(load_parts(config, 32), device)
    first = run_trial(family, params, parts, config, device, 0)
    assert isinstance(first.source, FeatureBatches) and len(calls) == 3  # two train views and validation
    assert all(view.device.type == device.type and view.dtype == torch.float32 for view in first.source.views)
    search.features.MEMORY.clear()  # a new worker: only the disk cache is left
    second = run_trial(family, params, parts, config, device, 0)
    assert len(calls) == 3  # read from the cache, not computed again
    assert torch.equal(first.source.views[0], second.source.views[0])
    with torch.inference_mode():
        on_cpu = first.model.backbone.float().cpu().eval()(
            search.features.normalize(parts["val"].images.cpu()).contiguous(memory_format=torch.channels_last))
    cached = first.source.eval_features["val"].cpu()
    assert on_cpu.abs().max() > 0.5  # real features, not the ~1e-9 of random weights
    assert _agree(cached, on_cpu)  # mixed-precision features agree with fp32 ones
    assert not _agree(torch.zeros_like(on_cpu), on_cpu)


def test_a_worker_on_the_device_runs_trials_of_two_batch_sizes(tiny_search, device) -> None:
    url = tiny_search.sqlite_url
    tiny_search.create(url, 4, "--param", "batch_size=8,16", "--param", "lr=0.01", "--param", "optimizer=adam",
                       "--param", "epochs=4", "--pruner", "none")
    done = work(open_storage(url), ["logreg"], device, threading.Event(),
                data_overrides={"cache_dir": tiny_search.cache_dir}, log=lambda line: None)
    assert done == {"logreg": 4}
    trials = tiny_search.trials(url)
    assert all(t.state == TrialState.COMPLETE and t.value > CHANCE for t in trials)


def test_a_resumed_adam_keeps_its_step_counts_on_the_cpu_and_its_moments_on_the_device(tiny_config, device, tmp_path,
                                                                                       monkeypatch) -> None:
    """Step counts on the GPU cost foreach Adam a host sync per parameter per step (it reads each with .item())."""
    family = get_family("cnn")
    params = family.resolve({"epochs": 3, "batch_size": 16, "optimizer": "adam"})
    parts = place(load_parts(tiny_config, 32), device)
    checkpoint = Checkpoint(tmp_path / "trial-0.pt", {"trial": 0})

    def interrupt(metrics) -> None:
        if metrics.epoch == 1:
            raise Interrupted("after epoch 1")

    with pytest.raises(Interrupted):
        run_trial(family, params, parts, tiny_config, device, 0, checkpoint=checkpoint, on_epoch=interrupt)
    optimizers: list = []
    make = search.trial.make_optimizer
    monkeypatch.setattr(search.trial, "make_optimizer", lambda *args: optimizers.append(make(*args)) or optimizers[-1])
    run_trial(family, params, parts, tiny_config, device, 0, checkpoint=checkpoint)
    assert checkpoint.restored_epochs == 1
    states = list(optimizers[0].state.values())
    assert states and all(s["step"].device.type == "cpu" for s in states)
    assert all(s[moment].device.type == device.type for s in states for moment in ("exp_avg", "exp_avg_sq"))


def test_the_memory_of_a_trial_that_ran_out_of_it_is_given_back(tiny_search, device, monkeypatch) -> None:
    """Other workers on the GPU (--workers-per-gpu) get it back: the cache is emptied once the trial's tensors,
    held by the error's traceback while it is handled, are gone."""
    if device.type != "cuda":
        pytest.skip("measures CUDA memory")
    held = 256 << 20
    reserved_when_raised: list[int] = []
    reserved_when_freed: list[int] = []

    def out_of_memory(*args, **kwargs):
        activations = torch.empty(held, dtype=torch.uint8, device=device)  # noqa: F841 - as a forward pass keeps
        reserved_when_raised.append(torch.cuda.memory_reserved(device))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    free = search.worker.free_device_memory

    def recording() -> None:
        free()
        reserved_when_freed.append(torch.cuda.memory_reserved(device))

    monkeypatch.setattr(search.trial, "train_epoch", out_of_memory)
    monkeypatch.setattr(search.worker, "free_device_memory", recording)
    url = tiny_search.sqlite_url
    tiny_search.create(url, 1)
    work(open_storage(url), ["logreg"], device, threading.Event(), data_overrides={"cache_dir": tiny_search.cache_dir},
         log=lambda line: None)
    assert reserved_when_freed and len(reserved_when_freed) == len(reserved_when_raised)
    assert all(freed <= raised - held for raised, freed in zip(reserved_when_raised, reserved_when_freed))


def test_images_kept_in_host_memory_reach_the_gpu_through_reused_pinned_buffers(tiny_config, device,
                                                                                 monkeypatch) -> None:
    """A dataset larger than half the free GPU memory stays pinned in host memory; every training batch is
    gathered into one of two sets of pinned buffers and copied without blocking, and none is overwritten in flight."""
    if device.type != "cuda":
        pytest.skip("pinned memory needs CUDA")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))  # nothing fits on the GPU
    parts = place(load_parts(tiny_config, 32), device)
    train = parts["train"]
    assert train.images.device.type == "cpu" and train.images.is_pinned() and train.labels.is_pinned()
    source = ImageBatches(parts, 8, Augmentation(), device, seed=0)
    buffers = [[buffer.data_ptr() for buffer in turn] for turn in source.staging.buffers]
    assert all(buffer.is_pinned() for turn in source.staging.buffers for buffer in turn)
    indices = list(TrainSampler(len(train), 8, torch.Generator().manual_seed(0)).epoch())
    batches = list(source.train_batches(1))  # all gathered and in flight before any is read back
    assert [[buffer.data_ptr() for buffer in turn] for turn in source.staging.buffers] == buffers
    assert len(batches) == len(indices) > 2
    for (x, y), index in zip(batches, indices):
        assert x.device.type == "cuda" and torch.allclose(x.cpu(), normalize(train.images[index]), rtol=0, atol=1e-6)
        assert y.device.type == "cuda" and torch.equal(y.cpu(), train.labels[index])
    fit = run_trial(get_family("cnn"), get_family("cnn").resolve({"epochs": 4, "batch_size": 16, "lr": 3e-3}), parts,
                    tiny_config, device, 0)
    assert max(m.val_accuracy for m in fit.history) > CHANCE + 0.25  # a whole trial on pinned data learns

"""`export` and bundles: weights, config, programs and README; loaded back with this project, and without it."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from conftest import REPO_ROOT, TINY_CLASSES
from data import load_images, normalize
from data.imagefolder import list_imagefolder
from search.bundle import TrainedModel, export_bundle, load_bundle, parse_formats, read_config
from search.cli import main
from search.errors import UserError
from search.family import get_family
from search.predict import Preprocess, predict
from search.records import BestResult

TINY_FAMILY = '''
from torch import nn

from search.family import Family
from search.space import integer
from search.training import training_space


def build(params, num_classes, image_size, weights):
    channels = params["channels"]
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


BUNDLED = Family(name="bundlenet", title="tiny conv net", build=build, image_size=16,
              space=[integer("channels", 4, 16), *training_space(batch_sizes=(8, 16), epochs=2)],
              reference={"channels": 8, "batch_size": 8})
'''


def _trained(family: str = "logreg", image_size: int = 16, **fields) -> TrainedModel:
    torch.manual_seed(0)
    known = get_family(family)
    params = known.resolve()
    model = known.create_model(params, num_classes=len(TINY_CLASSES), image_size=image_size).eval()
    return TrainedModel(model=model, family=family, params=params, classes=list(TINY_CLASSES), image_size=image_size,
                        trial=3, seed=3, test_accuracy=0.5, val_accuracy=0.625, trainable_parameters=4 * 769,
                        latency_ms={"batch_1": 0.1, "batch_256": 0.01}, **fields)


def _tiny_test_images(root: Path, size: int) -> torch.Tensor:
    return normalize(load_images("imagefolder", root, "test", size).images)


def _one_line(call) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert call() == 2
    assert err.getvalue().count("\n") == 1, err.getvalue()
    return err.getvalue()


def test_a_bundle_holds_weights_config_program_and_readme_and_loads_back_as_the_familys_module(
        tmp_path: Path, tiny_imagefolder: Path) -> None:
    trained = _trained()
    done = export_bundle(trained, tmp_path / "bundle", ["safetensors", "pt2"])

    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["README.md", "config.json",
                                                                      "model.pt2", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary folder left beside it
    config = read_config(tmp_path / "bundle")
    assert config == done.config
    assert config["family"] == {"name": "logreg", "title": "logistic regression", "origin": "built-in",
                                "file": None, "sha256": None}
    assert config["params"] == trained.params and config["classes"] == list(TINY_CLASSES)
    assert config["input"]["image_size"] == 16 and config["input"]["channel_order"] == "RGB"
    assert (config["input"]["mean"], config["input"]["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert config["metrics"]["test_accuracy"] == 0.5 and config["metrics"]["val_accuracy"] == 0.625
    assert config["trial"] == 3 and config["seed"] == 3 and config["format_version"] == 1
    assert set(config["files"]) == {"model.safetensors", "model.pt2", "README.md"}
    assert config["exported"]["provenance"]["packages"]["torch"]

    loaded = load_bundle(tmp_path / "bundle")
    assert type(loaded.model) is type(trained.model) and not loaded.model.training
    assert loaded.classes == list(TINY_CLASSES) and loaded.preprocess == Preprocess(16)
    x = _tiny_test_images(tiny_imagefolder, 16)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), trained.model(x))
        program = torch.export.load(str(tmp_path / "bundle" / "model.pt2")).module()
        assert torch.allclose(program(x), trained.model(x), atol=1e-6, rtol=0)
        assert program(x[:1]).shape == (1, 4)  # the batch axis is dynamic


def test_onnx_matches_pytorch_within_1e_4(tmp_path: Path, tiny_imagefolder: Path) -> None:
    import onnx
    import onnxruntime

    trained = _trained("cnn", 32)
    config = export_bundle(trained, tmp_path / "bundle", "safetensors,onnx").config
    model = onnx.load(str(tmp_path / "bundle" / "model.onnx"))
    assert config["onnx"]["opset"] >= 17 and config["onnx"]["max_abs_difference_vs_pytorch"] < 1e-4
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    session = onnxruntime.InferenceSession(str(tmp_path / "bundle" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    x = _tiny_test_images(tiny_imagefolder, 32)
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.inference_mode():
        expected = trained.model(x).numpy()
    assert np.abs(logits - expected).max() < 1e-4
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_onnx_without_its_packages_names_the_extra_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails, as when it is not installed
    with pytest.raises(UserError, match=re.escape("pip install 'stl10-search[onnx]'")):
        parse_formats("safetensors,onnx")
    assert parse_formats(None) == ["safetensors", "pt2"]  # the default leaves onnx out
    line = _one_line(lambda: main(["export", "--format", "onnx", "--storage", "sqlite:///nowhere/studies.db"]))
    assert "--format onnx needs the package onnx" in line and "pip install 'stl10-search[onnx]'" in line


def test_formats_are_checked_and_safetensors_always_written() -> None:
    assert parse_formats("pt2") == ["safetensors", "pt2"]
    assert parse_formats(["onnx", "safetensors"]) == ["safetensors", "onnx"]
    with pytest.raises(UserError, match="unknown export format torchscript; choose from safetensors, pt2, onnx"):
        parse_formats("safetensors,torchscript")


def test_a_failed_export_leaves_no_half_bundle_and_keeps_the_old_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import search.bundle

    first = export_bundle(_trained(), tmp_path / "bundle", ["safetensors", "pt2"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "bundle").iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(search.bundle, "bundle_readme", full_disk)  # the last files, after the weights and program
    with pytest.raises(UserError) as raised:
        export_bundle(_trained(), tmp_path / "bundle", ["safetensors", "pt2"])
    assert str(raised.value).startswith("cannot write README.md of the bundle ")
    assert "No space left on device" in str(raised.value) and "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "bundle").iterdir()} == before
    with pytest.raises(UserError):
        export_bundle(_trained(), tmp_path / "new", ["safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert first.config["files"]["model.safetensors"]["bytes"] > 0

    monkeypatch.undo()
    export_bundle(_trained(), tmp_path / "bundle", ["safetensors"])  # replaced whole, not merged
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_file_too_large_for_the_disk_is_one_line_whichever_library_writes_it(tmp_path: Path) -> None:
    """A real write failure (a file size limit, as a full disk fails a write) in safetensors' Rust writer and in
    the program's archive: one UserError line, nothing left behind, the process alive."""
    script = f'''
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG instead of killing
import torch
from search.bundle import TrainedModel, export_bundle
from search.errors import UserError
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
trained = TrainedModel(model=model, family="logreg", params={{}}, classes=list("abcd"), image_size=16)
for limit in (1000, 14000):  # safetensors is 12.4 kB, the program 27 kB
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        export_bundle(trained, {str(tmp_path / "bundle")!r}, ["safetensors", "pt2"])
    except UserError as error:
        print(error)
'''
    # -B: the limit would truncate the bytecode files of modules imported under it
    done = subprocess.run([sys.executable, "-B", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith("cannot write model.safetensors of the bundle") and "File too large" in lines[0]
    assert lines[1].startswith("cannot write model.pt2 of the bundle") and "File too large" in lines[1]
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_bundle_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not a model bundle"):
        export_bundle(_trained(), tmp_path / "mine", ["safetensors"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.json").write_text('{"name": "my project"}')  # a config.json, not a bundle's
    with pytest.raises(UserError, match="exists and is not a model bundle"):
        export_bundle(_trained(), tmp_path / "project", ["safetensors"])
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["config.json"]
    (tmp_path / "empty").mkdir()
    export_bundle(_trained(), tmp_path / "empty", ["safetensors"])  # an empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()


def test_a_family_file_bundle_is_rebuilt_from_the_file_warns_when_it_changed_and_falls_back_to_the_program(
        tmp_path: Path, tiny_imagefolder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import search.family

    search.family.families()  # the built-in ones first, so the registry restored after the test holds them
    monkeypatch.setattr(search.family, "_REGISTRY", dict(search.family._REGISTRY))  # registered for this test only
    monkeypatch.setattr(search.family, "_FILES", dict(search.family._FILES))
    path = tmp_path / "tiny_family.py"
    path.write_text(TINY_FAMILY)
    search.family.load_family_file(path)
    trained = _trained("bundlenet", 16, family_origin=str(path.resolve()), family_file=str(path.resolve()))
    with torch.no_grad():  # batch-norm statistics that are not the defaults, so the weights file matters
        trained.model[1].running_mean.uniform_(-1, 1)
    config = export_bundle(trained, tmp_path / "bundle", ["safetensors", "pt2"]).config
    import hashlib

    assert config["family"]["file"] == str(path.resolve())
    assert config["family"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    x = _tiny_test_images(tiny_imagefolder, 16)
    with torch.inference_mode():
        expected = trained.model(x)

    lines: list[str] = []
    rebuilt = load_bundle(tmp_path / "bundle", log=lines.append).model
    assert isinstance(rebuilt, torch.nn.Sequential) and lines == []

    path.write_text(TINY_FAMILY + "\n# edited\n")
    changed = load_bundle(tmp_path / "bundle", log=lines.append).model
    assert isinstance(changed, torch.nn.Sequential)
    assert len(lines) == 1 and "changed since bundle" in lines[0] and "sha256 differs" in lines[0]

    path.unlink()
    lines.clear()
    program = load_bundle(tmp_path / "bundle", log=lines.append).model
    assert not isinstance(program, torch.nn.Sequential)  # the torch.export program's module
    assert lines == [f"bundle {tmp_path / 'bundle'}: family file {path.resolve()} is absent; using model.pt2"]
    with torch.inference_mode():
        for model in (rebuilt, changed, program):
            assert torch.allclose(model(x), expected, atol=1e-6, rtol=0)
    found = predict(load_bundle(tmp_path / "bundle", log=lines.append), tiny_imagefolder / "test")
    top = expected.topk(3).indices.tolist()
    assert [r.classes for r in found.rows] == [[TINY_CLASSES[i] for i in row] for row in top]


def test_export_before_best_has_run_says_so_in_one_line(tiny_search) -> None:
    tiny_search.create(tiny_search.sqlite_url, 1)
    line = _one_line(lambda: main(["export", "--model", "logreg", "--storage", tiny_search.sqlite_url,
                                   "--out", str(tiny_search.folder / "bundles")]))
    assert "study 'logreg' has no tested model yet; run `stl10-search best --model logreg` first" in line
    assert not (tiny_search.folder / "bundles").exists()
    line = _one_line(lambda: main(["export", "--model", "mlp", "--storage", tiny_search.sqlite_url]))
    assert "no study 'mlp' in storage" in line


# --- end to end: a tiny search, best, export, and a fresh process without this project -------------------------

FRESH_PROCESS = r'''
import json, os, re, sys

for name in ("search", "data", "models"):
    sys.modules[name] = None  # this project is not importable here, whatever the environment holds
try:
    import search
except ImportError:
    pass
else:
    raise SystemExit("this project is importable in the fresh process")

bundle, paths = sys.argv[1], json.loads(sys.argv[2])
os.chdir(bundle)
blocks = re.findall(r"```python\n(.*?)```", open("README.md").read(), re.S)
plain, runtime = {}, {}
exec(next(b for b in blocks if "torch.export.load" in b).replace('"image.jpg"', repr(paths[0])), plain)
exec(next(b for b in blocks if "onnxruntime" in b).replace('"image.jpg"', repr(paths[0])), runtime)

import numpy as np, torch
from safetensors.torch import load_file

model, names = plain["model"], plain["config"]["onnx"]
weights, state = load_file("model.safetensors"), model.state_dict()
x = torch.stack([plain["preprocess"](p) for p in paths])
with torch.no_grad():
    logits = model(x).numpy()
session = runtime["session"]
(onnx_logits,) = session.run([names["output"]], {names["input"]: x.numpy()})
own_x = np.stack([runtime["preprocess"](p) for p in paths])
(onnx_own,) = session.run([names["output"]], {names["input"]: own_x})
print(json.dumps({
    "pytorch": logits.argmax(1).tolist(), "onnx": onnx_logits.argmax(1).tolist(),
    "onnx_own_preprocess": onnx_own.argmax(1).tolist(), "onnx_max_difference": float(abs(onnx_logits - logits).max()),
    "same_weights": sorted(weights) == sorted(state) and all(torch.equal(weights[k], state[k]) for k in weights),
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("search", "data", "models")
                              and sys.modules[m] is not None),
}))
'''


@pytest.fixture(scope="module")
def exported(tiny_imagefolder: Path, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """logreg (16px) and a frozen MobileNetV2 (48px, the shared ImageNet weights): one trial each, `best`, then
    `export` of both with every format."""
    from search.storage import open_storage
    from search.worker import work

    weights = shared_dir / "weights" / "mobilenet_v2_imagenet_coral.pth"
    if not weights.is_file():
        pytest.skip(f"{weights} is absent")
    folder = tmp_path_factory.mktemp("exported")
    url, cache = f"sqlite:///{folder}/studies.db", folder / "cache"
    assert main(["search", "--model", "logreg,mobilenet_frozen", "--n-trials", "1", "--workers", "0",
                 "--pruner", "none", "--dataset", "imagefolder", "--data-root", str(tiny_imagefolder),
                 "--image-size", "16", "--param", "epochs=2", "--param", "mobilenet_frozen.image_size=48",
                 "--param", "mobilenet_frozen.feature_views=1", "--weights", str(weights), "--storage", url,
                 "--cache-dir", str(cache)]) == 0
    done = work(open_storage(url), ["logreg", "mobilenet_frozen"], torch.device("cpu"), threading.Event(),
                data_overrides={"cache_dir": cache}, log=lambda message: None)
    assert done == {"logreg": 1, "mobilenet_frozen": 1}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["best", "--storage", url, "--cache-dir", str(cache), "--device", "cpu"]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", "--storage", url, "--out", str(folder / "bundles"),
                     "--format", "safetensors,pt2,onnx"]) == 0
    return {"url": url, "folder": folder, "printed": out.getvalue()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["logreg", "mobilenet_frozen"])
def test_a_fresh_process_without_this_project_predicts_what_best_tested(exported: dict, name: str,
                                                                       tiny_imagefolder: Path) -> None:
    """The bundle README's PyTorch and onnxruntime code, run in `python -I` with this project blocked, on the
    test split: the predictions give `best`'s confusion matrix, ONNX agrees with PyTorch within 1e-4, and the
    safetensors weights are the program's."""
    bundle = exported["folder"] / "bundles" / name
    assert re.search(rf"^{name}: bundle {re.escape(str(bundle))} \(model.safetensors [\d.]+ MB, model.pt2 [\d.]+ MB, "
                     rf"model.onnx [\d.]+ MB; test accuracy [\d.]+%\) in [\d.]+s$", exported["printed"], re.MULTILINE)
    stored = BestResult.load(optuna.load_study(study_name=name, storage=exported["url"])).to_json()
    listing = list_imagefolder(tiny_imagefolder, "test")
    paths = [str(tiny_imagefolder / "test" / f) for f in listing.files]

    done = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS, str(bundle), json.dumps(paths)],
                          cwd=exported["folder"], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(exported["folder"])})
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.splitlines()[-1])
    assert done.stdout.splitlines()[0].split()[0] in TINY_CLASSES  # the README's example printed a class
    assert fresh["project_modules"] == [] and fresh["same_weights"]

    from search.best import confusion_matrix

    labels = torch.tensor(listing.labels)
    assert confusion_matrix(labels, torch.tensor(fresh["pytorch"]), len(TINY_CLASSES)) == stored["confusion_matrix"]
    assert fresh["onnx"] == fresh["pytorch"] == fresh["onnx_own_preprocess"]
    assert fresh["onnx_max_difference"] < 1e-4
    in_process = predict(load_bundle(bundle), tiny_imagefolder / "test")
    assert [TINY_CLASSES.index(r.classes[0]) for r in in_process.rows] == fresh["pytorch"]
    assert in_process.accuracy == stored["test_accuracy"]


@pytest.mark.slow
def test_export_says_in_one_line_when_the_weights_are_missing(exported: dict, tmp_path: Path) -> None:
    line = _one_line(lambda: main(["export", "--model", "logreg", "--storage", exported["url"],
                                   "--artifacts", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "b")]))
    assert "the weights of study 'logreg'" in line and "are not in" in line and "--artifacts" in line
    assert not (tmp_path / "b").exists()

"""A retrained model as a folder anyone can use, and loading it back.

    BUNDLE/config.json        family, params, classes, input size and normalisation, metrics, trial, seed, provenance
    BUNDLE/model.safetensors  the weights by parameter name (always)
    BUNDLE/model.pt2          a torch.export program: graph and weights, loaded with plain PyTorch ("pt2")
    BUNDLE/model.onnx         ONNX, dynamic batch, for onnxruntime ("onnx", with the `onnx` extra)
    BUNDLE/README.md          how to load it without this project

The weights alone cannot rebuild a network without the family's builder, so the programs carry the graph for
users without this project; `load_bundle` rebuilds the family's own nn.Module when it can. A bundle is written
into a temporary folder beside its target and renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from search.errors import USER_ERRORS, UserError
from search.predict import LoadedModel, Preprocess

FORMAT_VERSION = 1
FORMATS = ("safetensors", "pt2", "onnx")
FILES = {"safetensors": "model.safetensors", "pt2": "model.pt2", "onnx": "model.onnx"}
ONNX_EXTRA = "pip install 'stl10-search[onnx]'"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_TOLERANCE = 1e-4  # largest |ONNX - PyTorch| logit difference accepted at export, in fp32
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
EXAMPLE_BATCH = 2  # the traced batch; its dimension is exported as dynamic (a batch of 1 would be specialised)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TrainedModel:
    """What an export needs: the trained network and everything that says how it was made and is to be fed."""

    model: nn.Module
    family: str
    params: dict[str, Any]
    classes: list[str]  # in output order
    image_size: int
    trial: int | None = None
    seed: int | None = None
    test_accuracy: float | None = None
    val_accuracy: float | None = None
    trainable_parameters: int | None = None
    latency_ms: dict[str, float] | None = None
    family_origin: str = "built-in"  # "built-in", "entry point MODULE", or the family file's path
    family_file: str | None = None  # a family defined in a file: where (its content hash goes in config.json)
    study: str | None = None
    provenance: dict[str, Any] | None = None  # what made the model, where known (the process that retrained it)
    extra: dict[str, Any] = field(default_factory=dict)  # more figures for config.json's "metrics"

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size)


def bundle_config(trained: TrainedModel) -> dict[str, Any]:
    """config.json without its "files" and "exported" parts: everything that says what the model is."""
    from search.family import families

    known = families().get(trained.family)
    family_file = trained.family_file
    return {
        "format_version": FORMAT_VERSION,
        "family": {
            "name": trained.family,
            "title": known.title if known else trained.family,
            "origin": trained.family_origin,
            "file": family_file,
            "sha256": file_sha256(Path(family_file)) if family_file and Path(family_file).is_file() else None,
        },
        "params": trained.params,
        "classes": list(trained.classes),
        "input": trained.preprocess.config(),
        "metrics": {"test_accuracy": trained.test_accuracy, "val_accuracy": trained.val_accuracy,
                    "trainable_parameters": trained.trainable_parameters, "latency_ms": trained.latency_ms,
                    **trained.extra},
        "study": trained.study,
        "trial": trained.trial,
        "seed": trained.seed,
        "provenance": trained.provenance,
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_formats(text: str | Sequence[str] | None) -> list[str]:
    """The formats to write, in FORMATS order; safetensors always. None: every format, onnx only when its
    packages are installed. Asking for onnx without them is a UserError naming the extra."""
    if text is None:
        return [f for f in FORMATS if f != "onnx" or _missing_onnx_package() is None]
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown:
        raise UserError(f"unknown export format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if "onnx" in names:
        missing = _missing_onnx_package()
        if missing is not None:
            raise UserError(f"--format onnx needs the package {missing}, which is not installed: {ONNX_EXTRA}")
    return [f for f in FORMATS if f in names or f == "safetensors"]


def _missing_onnx_package() -> str | None:
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            return name
    return None


@dataclass(frozen=True)
class Export:
    folder: Path
    config: dict[str, Any]
    seconds: float


def export_bundle(trained: TrainedModel, out: Path | str, formats: Sequence[str] | str | None = None) -> Export:
    """Write `trained` as a bundle folder `out` (replacing a bundle there); see the module docstring.

    A model that torch.export cannot trace is a UserError for a family of the user's (the message says to
    export safetensors alone) and an error for a built-in one. ONNX outputs are checked against PyTorch's on
    the traced batch: a difference over ONNX_TOLERANCE is refused.
    """
    started = time.perf_counter()
    formats = parse_formats(formats)
    out = Path(out).expanduser()
    _check_target(out)
    temporary = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        with _writing(out, out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
        config = bundle_config(trained)
        model = copy.deepcopy(trained.model).cpu().to(memory_format=torch.contiguous_format).eval()
        with _writing(out, temporary / FILES["safetensors"]):
            from safetensors.torch import save_model

            save_model(model, str(temporary / FILES["safetensors"]), metadata={"format": "pt"},
                       force_contiguous=True)
        example = _example_batch(trained.image_size)
        if "pt2" in formats or "onnx" in formats:
            program = _export_program(model, example, trained)
        if "pt2" in formats:
            archive = io.BytesIO()  # torch's archive writer aborts the process when a full disk fails it twice
            torch.export.save(program, archive)
            with _writing(out, temporary / FILES["pt2"]):
                (temporary / FILES["pt2"]).write_bytes(archive.getbuffer())
        if "onnx" in formats:
            config["onnx"] = _write_onnx(program, model, example, temporary / FILES["onnx"], out, trained)
        with _writing(out, temporary / "README.md"):
            (temporary / "README.md").write_text(bundle_readme(config, formats), encoding="utf-8")
            for name in (FILES[f] for f in formats):  # safetensors writes 0600; a bundle is for sharing
                (temporary / name).chmod((temporary / "README.md").stat().st_mode)
        config["files"] = {name: {"bytes": (temporary / name).stat().st_size, "sha256": file_sha256(temporary / name)}
                           for name in [FILES[f] for f in formats] + ["README.md"]}
        from search.provenance import provenance

        config["exported"] = {"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "seconds": round(time.perf_counter() - started, 2),
                              "provenance": provenance().as_dict()}
        with _writing(out, temporary / "config.json"):
            (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            _move_into_place(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return Export(out, config, time.perf_counter() - started)


def _check_target(out: Path) -> None:
    """A target that exists must be a bundle (replaced) or an empty folder: never someone's other files."""
    if out.exists() and not _is_bundle(out) and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not a model bundle; pass another --out, or remove it")


def _is_bundle(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "format_version" in config and "family" in config


def _move_into_place(temporary: Path, out: Path) -> None:
    """Rename the finished folder onto `out`; an older bundle there is moved aside first (and back, should the
    rename fail), then deleted."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        os.replace(out, old)
    try:
        os.replace(temporary, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _writing(out: Path, path: Path) -> Iterator[None]:
    """A file that cannot be written (a full disk, no permission) is one line, whichever library wrote it:
    OSError from Python and ONNX, SafetensorError from safetensors."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        reason = (getattr(error, "strerror", None) or str(error)).strip().splitlines() or [type(error).__name__]
        raise UserError(f"cannot write {path.name} of the bundle {out} ({reason[0]}); nothing was written: "
                        "free some space or pass a writable --out") from None


def _example_batch(image_size: int) -> torch.Tensor:
    """A normalised batch of random images, fixed by seed: the traced input and the ONNX check's."""
    from data import normalize

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (EXAMPLE_BATCH, 3, image_size, image_size), generator=generator, dtype=torch.uint8)
    return normalize(pixels)


def _export_program(model: nn.Module, example: torch.Tensor, trained: TrainedModel) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as error:  # noqa: BLE001 - a family's model torch.export cannot trace; ours would be a bug
        if trained.family_origin == "built-in":
            raise
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"model family {trained.family} ({trained.family_origin}) cannot be exported by "
                        f"torch.export ({type(error).__name__}: {reason}); pass --format safetensors") from None


def _write_onnx(program: torch.export.ExportedProgram, model: nn.Module, example: torch.Tensor, path: Path,
                out: Path, trained: TrainedModel) -> dict[str, Any]:
    """model.onnx with the torch.export-based exporter (the TorchScript-based one is deprecated), checked with
    onnxruntime on the example batch."""
    import onnxruntime

    try:
        exported = torch.onnx.export(program, (example,), dynamo=True, verbose=False, input_names=[ONNX_INPUT],
                                     output_names=[ONNX_OUTPUT])
    except Exception as error:  # noqa: BLE001 - as in _export_program
        if trained.family_origin == "built-in":
            raise
        raise UserError(f"model family {trained.family} ({trained.family_origin}) cannot be exported to ONNX "
                        f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); "
                        "leave onnx out of --format") from None
    with _writing(out, path):
        exported.save(str(path), external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(example).numpy()
    difference = float(abs(session.run([ONNX_OUTPUT], {ONNX_INPUT: example.numpy()})[0] - expected).max())
    if not difference <= ONNX_TOLERANCE:
        raise UserError(f"the ONNX export of {trained.family} differs from PyTorch by {difference:.2e} "
                        f"(over {ONNX_TOLERANCE:g}); leave onnx out of --format")
    opset = next(o.version for o in exported.model_proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "input": ONNX_INPUT, "output": ONNX_OUTPUT, "dynamic_axes": {ONNX_INPUT: {"0": "batch"}},
            "max_abs_difference_vs_pytorch": difference}


def load_bundle(folder: Path | str, *, log: Callable[[str], None] = _log) -> LoadedModel:
    """The bundle's model in eval mode on the CPU, its Preprocess, classes and config; no storage needed.

    The family's own nn.Module is rebuilt when the family is known (built in, installed, or its file present;
    a file whose content changed since the export is used with a warning) and the weights loaded strictly from
    model.safetensors. Otherwise the torch.export program model.pt2 is the model.
    """
    folder = Path(folder).expanduser()
    config = read_config(folder)
    preprocess = Preprocess.from_config(config["input"])
    classes = list(config["classes"])
    model = _rebuild(folder, config, log)
    if model is None:
        program = folder / FILES["pt2"]
        if not program.is_file():
            raise UserError(f"bundle {folder}: its model family {config['family']['name']} is not available here "
                            f"and it has no {FILES['pt2']}; export it again with the pt2 format")
        model = torch.export.load(str(program)).module()
    return LoadedModel(model, preprocess, classes, config)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a model bundle (no config.json); make one with `stl10-search export`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        version = int(config["format_version"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a bundle's config ({type(error).__name__}: {error})") from None
    if version > FORMAT_VERSION:
        raise UserError(f"bundle {folder} has format {version}, newer than this stl10-search reads "
                        f"({FORMAT_VERSION}); upgrade stl10-search")
    return config


def _rebuild(folder: Path, config: dict[str, Any], log: Callable[[str], None]) -> nn.Module | None:
    """The family's nn.Module with the bundle's weights, or None when the family is not available here."""
    from safetensors.torch import load_model

    from search.family import get_family, load_family_file

    family = config["family"]
    if family.get("file"):
        path = Path(family["file"])
        if not path.is_file():
            log(f"bundle {folder}: family file {path} is absent; using {FILES['pt2']}")
            return None
        if family.get("sha256") and file_sha256(path) != family["sha256"]:
            log(f"warning: family file {path} changed since bundle {folder} was exported (its sha256 differs); "
                "rebuilding the model with it as it is now")
        load_family_file(path)
    try:
        built = get_family(family["name"]).create_model(config["params"], num_classes=len(config["classes"]),
                                                        image_size=int(config["input"]["image_size"]),
                                                        weights="none")
    except USER_ERRORS as error:
        log(f"bundle {folder}: cannot rebuild model family {family['name']} here ({error}); using {FILES['pt2']}")
        return None
    try:
        load_model(built, str(folder / FILES["safetensors"]), strict=True)
    except (RuntimeError, OSError) as error:  # missing or unexpected names, shapes that differ, an absent file
        reason = " ".join(str(error).split())[:300]
        if family.get("file") and (folder / FILES["pt2"]).is_file():
            log(f"bundle {folder}: its weights do not fit the family file as it is now ({reason}); using "
                f"{FILES['pt2']}")
            return None
        raise UserError(f"bundle {folder}: {FILES['safetensors']} does not fit model family {family['name']} "
                        f"with its params ({reason})") from None
    return built.eval()


def stored_model(study: Any, artifacts: Path) -> TrainedModel:
    """The model `best` retrained and stored on `study` (its `search.records.BestResult`), rebuilt from its weights
    artifact in `artifacts`; nothing is trained. A study that `best` has not tested is a UserError."""
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.artifacts.exceptions import ArtifactNotFound

    from search.records import BestResult
    from search.studies import load_settings

    result = BestResult.load(study)
    settings = load_settings(study)
    if result is None:
        raise UserError(f"study {study.study_name!r} has no tested model yet; run `stl10-search best --model "
                        f"{settings.family}` first")
    family = settings.model_family()
    params, classes = dict(result.params), list(result.classes)
    size = family.size_for(params, settings.data.get("image_size"))
    try:
        with FileSystemArtifactStore(artifacts).open_reader(result.artifact_id) as reader:
            state = torch.load(io.BytesIO(reader.read()), map_location="cpu", weights_only=True)
    except (ArtifactNotFound, FileNotFoundError):
        raise UserError(f"the weights of study {study.study_name!r} (artifact {result.artifact_id}) are not in "
                        f"{artifacts}; pass --artifacts with the folder `best` stored them in, or run "
                        f"`stl10-search best --force`") from None
    model = family.create_model(params, num_classes=len(classes), image_size=size, weights="none")
    model.load_state_dict(state, strict=True)
    return TrainedModel(
        model=model.eval(), family=family.name, params=params, classes=classes, image_size=size,
        trial=result.trial, seed=result.seed, test_accuracy=result.test_accuracy,
        val_accuracy=result.val_accuracy, trainable_parameters=result.trainable_parameters,
        latency_ms=result.latency_ms or None, family_origin=family.origin, family_file=settings.family_file,
        study=study.study_name, provenance=result.provenance,
        extra=dict(test_loss=result.test_loss, test_images=result.test_images, epochs=result.epochs,
                   full_train=result.full_train, retrained_on=result.device),
    )


def load_best(storage: Any, study_name: str, artifacts: Path) -> LoadedModel:
    """The model `best` stored on study `study_name` of an open storage, ready to predict; no bundle written."""
    import optuna

    trained = stored_model(optuna.load_study(study_name=study_name, storage=storage), artifacts)
    return LoadedModel(trained.model, trained.preprocess, list(trained.classes), bundle_config(trained))


README = """# {title}: a model bundle of stl10-search

{summary}

| file | what |
|---|---|
{files}

Inputs: RGB images resized to {size}x{size} (antialiased bilinear on uint8 pixels), divided by 255, then
normalised per channel with mean {mean} and std {std}; a float32 batch [N, 3, {size}, {size}].
Outputs: {n_classes} logits in the order of `classes` in config.json ({classes}).

## With plain PyTorch (no stl10-search)

The weights alone cannot rebuild this network: its builder is part of stl10-search{family_note}. So the
plain-PyTorch path is a program that carries the graph with the weights; `model.safetensors` holds the same
weights by parameter name (`safetensors.torch.load_file("model.safetensors")`), for code that builds the
network itself.
{pytorch_section}{onnx_section}
## With stl10-search

```python
from search.bundle import load_bundle
from search.predict import predict

predictions = predict(load_bundle("BUNDLE"), ["image.jpg"], top_k=3)
```

or `stl10-search predict --bundle BUNDLE image.jpg` (`--folder DIR` for a folder; in DIR/<class>/ layout it also
prints accuracy and a confusion matrix).
"""

PYTORCH_SECTION = """
```python
import json, numpy as np, torch
from PIL import Image

config = json.load(open("config.json"))
model = torch.export.load("model.pt2").module()  # graph and weights; exported in eval mode
size, mean, std = config["input"]["image_size"], config["input"]["mean"], config["input"]["std"]

def preprocess(path):
    with Image.open(path) as picture:
        picture.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, as training did
        picture = picture.convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)

with torch.no_grad():
    probabilities = model(preprocess("image.jpg").unsqueeze(0)).softmax(1)[0]
print(config["classes"][int(probabilities.argmax())], float(probabilities.max()))
```

PIL's bilinear resize gave the same pixels as torchvision's `resize(..., antialias=True)` that training uses.
"""

NO_PROGRAM = """
This bundle was exported without `model.pt2`; export it again with `--format safetensors,pt2` for one.
"""

ONNX_SECTION = """
## With onnxruntime

```python
import json, numpy as np, onnxruntime
from PIL import Image

config = json.load(open("config.json"))
session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
size = config["input"]["image_size"]
mean = np.array(config["input"]["mean"], dtype=np.float32).reshape(3, 1, 1)
std = np.array(config["input"]["std"], dtype=np.float32).reshape(3, 1, 1)

def preprocess(path):
    with Image.open(path) as picture:
        picture.draft("RGB", (size, size))
        picture = picture.convert("RGB").resize((size, size), Image.BILINEAR)
    return (np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / 255 - mean) / std

(logits,) = session.run(["{output}"], {{"{input}": preprocess("image.jpg")[None]}})
print(config["classes"][int(logits[0].argmax())])
```

Opset {opset}, dynamic batch axis; its logits were within {difference:.1e} of PyTorch's at export.
"""


def bundle_readme(config: dict[str, Any], formats: Sequence[str]) -> str:
    """The bundle's README.md, filled in from its config."""
    family, metrics = config["family"], config["metrics"]
    figures = [f"{label} {metrics[key]:{form}}" for key, label, form in (
        ("test_accuracy", "test accuracy", ".2%"), ("val_accuracy", "validation accuracy", ".2%"),
        ("trainable_parameters", "trainable parameters", ",")) if metrics.get(key) is not None]
    study = (f"trial #{config['trial']} of study `{config['study']}`, seed {config['seed']}; "
             if config.get("study") else "")
    summary = (f"Model family `{family['name']}` ({family['origin']}), {study}{', '.join(figures)}. "
               "Everything else is in `config.json`.")
    what = {"model.safetensors": "the weights, by parameter name",
            "model.pt2": "torch.export program (graph + weights)", "model.onnx": "ONNX model (graph + weights)",
            "config.json": "family, params, classes, input, metrics, trial, seed, provenance"}
    files = "\n".join(f"| `{name}` | {what[name]} |" for name in ["config.json", *(FILES[f] for f in formats)])
    onnx = config.get("onnx")
    onnx_section = (ONNX_SECTION.format(input=onnx["input"], output=onnx["output"], opset=onnx["opset"],
                                        difference=onnx["max_abs_difference_vs_pytorch"]) if onnx else "")
    family_note = f" (family file {family['file']})" if family.get("file") else ""
    shown = config["classes"] if len(config["classes"]) <= 12 else config["classes"][:12] + ["..."]
    return README.format(title=family["title"], summary=summary, files=files, size=config["input"]["image_size"],
                         mean=tuple(config["input"]["mean"]), std=tuple(config["input"]["std"]),
                         n_classes=len(config["classes"]), classes=", ".join(shown), family_note=family_note,
                         pytorch_section=PYTORCH_SECTION if "pt2" in formats else NO_PROGRAM,
                         onnx_section=onnx_section)

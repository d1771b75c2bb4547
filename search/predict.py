"""Predict with a trained model: image files in, top-k classes and probabilities out.

Images are read exactly as training read them (`data.imagefolder.decode_image` and `resize_pictures`, then
`data.transforms.normalize`), so a folder in ImageFolder layout gets the accuracy `best` measured on it.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from tqdm import tqdm

from data import IMAGENET_MEAN, IMAGENET_STD, DataError, eval_batch_size, normalize
from data.imagefolder import decode_image, find_images, resize_pictures
from search.errors import UserError
from search.pipeline import eval_batch_cap
from search.training import autocast, confusion_matrix

RESIZE = ("decode with PIL (JPEG draft mode at image_size), convert to RGB, resize uint8 to image_size x image_size "
          "with antialiased bilinear interpolation (torchvision resize antialias=True; PIL Image.resize BILINEAR "
          "gave the same pixels)")
VALUE_RANGE = "uint8 0..255 divided by 255, then (x - mean) / std per channel"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Preprocess:
    """Image files to model inputs, as training made them: RGB, resized to a square, ImageNet-normalised."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        if (self.mean, self.std) != (IMAGENET_MEAN, IMAGENET_STD):
            raise UserError(f"normalisation mean {self.mean}, std {self.std} is not the one this version trains "
                            f"with (ImageNet's: mean {IMAGENET_MEAN}, std {IMAGENET_STD})")

    def read(self, paths: Sequence[Path | str]) -> tuple[torch.Tensor, list[int], list[str]]:
        """(uint8 [N, 3, S, S] of the files that decode, their indices in `paths`, one line per file that did not)."""
        pictures, kept, problems = [], [], []
        for index, path in enumerate(paths):
            try:
                pictures.append(decode_image(path, self.image_size))
                kept.append(index)
            except DataError as error:
                problems.append(str(error))
        if not pictures:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8), kept, problems
        return resize_pictures(pictures, self.image_size), kept, problems

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> float32 model input, on the images' device."""
        return normalize(images)

    def config(self) -> dict[str, Any]:
        """What a user without this project needs to make the same inputs (config.json's "input")."""
        return {"image_size": self.image_size, "channel_order": "RGB", "layout": "NCHW float32",
                "value_range": VALUE_RANGE, "mean": list(self.mean), "std": list(self.std), "resize": RESIZE}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocess:
        return cls(int(config["image_size"]), tuple(config["mean"]), tuple(config["std"]))


class LoadedModel(NamedTuple):
    """A model ready to predict: the network (eval mode, on the CPU), its inputs, its classes in output order,
    and the bundle's config (`search.bundle.bundle_config`)."""

    model: nn.Module
    preprocess: Preprocess
    classes: list[str]
    config: dict[str, Any]


@dataclass(frozen=True)
class Prediction:
    path: str
    classes: list[str]  # the top k, most probable first
    probabilities: list[float]
    label: str | None = None  # the true class, from the folder an image sits in (ImageFolder layout)


@dataclass
class Predictions:
    rows: list[Prediction]
    classes: list[str]  # the model's, in output order
    skipped: list[str]  # one line per file that could not be read
    confusion_matrix: list[list[int]] | None = None  # rows true class, columns top-1 prediction; labelled images

    @property
    def accuracy(self) -> float | None:
        if self.confusion_matrix is None:
            return None
        total = sum(map(sum, self.confusion_matrix))
        return sum(row[i] for i, row in enumerate(self.confusion_matrix)) / total if total else None


def folder_images(folder: Path | str, classes: Sequence[str], log: Callable[[str], None] = _log
                  ) -> tuple[list[Path], list[str] | None]:
    """The image files under `folder` and, in ImageFolder layout (every image under FOLDER/<one of `classes`>/),
    each one's class; labels are None otherwise (and a line says why, when the folder has class folders)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    files = find_images(folder)
    if not files:
        raise UserError(f"no image files under {folder}")
    tops = [f.split("/")[0] if "/" in f else None for f in files]
    labels = None
    if None not in tops:
        unknown = sorted(set(tops) - set(classes))
        if unknown:
            log(f"no accuracy: the class folders {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                f"of {folder} are not classes of the model ({', '.join(classes)})")
        else:
            labels = tops
    return [folder / f for f in files], labels


def predict(
    model_or_bundle: LoadedModel | nn.Module,
    images: Path | str | Sequence[Path | str],
    *,
    top_k: int = 3,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    preprocess: Preprocess | None = None,
    classes: Sequence[str] | None = None,
    log: Callable[[str], None] = _log,
) -> Predictions:
    """Top-k classes and probabilities per image; a folder in ImageFolder layout also gets a confusion matrix.

    `images` is a folder or a list of image files. A bare nn.Module needs `preprocess` and `classes`; a
    `LoadedModel` (`search.bundle.load_bundle`) carries them. The model is moved to `device` and evaluated
    as `best` evaluates: batches of one shape (the last padded), channels-last for convolutions, bfloat16
    autocast on CUDA. A file that cannot be read is one line through `log` and skipped.
    """
    if isinstance(model_or_bundle, LoadedModel):
        model, preprocess, classes = model_or_bundle.model, model_or_bundle.preprocess, model_or_bundle.classes
    else:
        model = model_or_bundle
    if preprocess is None or classes is None:
        raise UserError("predict needs the model's preprocess and classes: pass a bundle (search.bundle.load_bundle) "
                        "or preprocess= and classes=")
    classes = list(classes)
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    device = torch.device(device)
    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        paths, labels = folder_images(images, classes, log)
    else:
        paths, labels = [Path(p) for p in ([images] if isinstance(images, (str, os.PathLike)) else images)], None
    if not paths:
        raise UserError("no images to predict")
    size = batch_size or eval_batch_size(len(paths), eval_batch_cap(device))
    model, layout = _inference_model(model, device)
    k = min(top_k, len(classes))
    rows, skipped = [], []
    progress = tqdm(total=len(paths), unit="image", desc="predicting", leave=False, file=sys.stderr,
                    disable=None if len(paths) > size else True)
    with progress, torch.inference_mode():
        for start in range(0, len(paths), size):
            chunk = paths[start:start + size]
            pictures, kept, problems = preprocess.read(chunk)
            for problem in problems:
                log(f"skipped: {problem}")
            skipped += problems
            progress.update(len(chunk))
            if not kept:
                continue
            probabilities = _probabilities(model, preprocess.normalize, pictures, size, device, layout)
            top = probabilities.topk(k, dim=1)
            for row, index in enumerate(kept):
                rows.append(Prediction(str(chunk[index]), [classes[c] for c in top.indices[row].tolist()],
                                       top.values[row].tolist(), None if labels is None else labels[start + index]))
    if not rows:
        raise UserError(f"none of the {len(paths)} image(s) could be read (see the lines above)")
    matrix = None
    if labels is not None:
        truth = torch.tensor([classes.index(r.label) for r in rows])
        predicted = torch.tensor([classes.index(r.classes[0]) for r in rows])
        matrix = confusion_matrix(truth, predicted, len(classes))
    return Predictions(rows, classes, skipped, matrix)


def _inference_model(model: nn.Module, device: torch.device) -> tuple[nn.Module, torch.memory_format]:
    """The model in eval mode on `device`, and its input layout: channels-last when it convolves, as `best`
    trains and tests it."""
    from search.trial import has_convolutions

    try:
        model.eval()
    except NotImplementedError:  # a torch.export program's module: exported in eval mode, it has no train mode
        pass
    model = model.to(device)
    if has_convolutions(model):
        return model.to(memory_format=torch.channels_last), torch.channels_last
    return model, torch.contiguous_format


def _probabilities(model: nn.Module, normalize_images: Callable[[torch.Tensor], torch.Tensor], pictures: torch.Tensor,
                   size: int, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    """Softmax over classes of one batch, padded to `size` rows by repeating its last image and cut back."""
    count = len(pictures)
    if count < size:
        pictures = torch.cat([pictures, pictures[-1:].expand(size - count, -1, -1, -1)])
    x = normalize_images(pictures.to(device)).contiguous(memory_format=layout)
    with autocast(device):
        logits = model(x)
    return logits[:count].float().softmax(1).cpu()


def write_predictions(predictions: Predictions, path: Path | str) -> None:
    """CSV (path, label, class_i, probability_i for i = 1..k) for .csv; one JSON object per line for .jsonl/.json."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise UserError(f"--out {path}: use a .csv or .jsonl file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as out:
            if suffix == ".csv":
                k = max(len(r.classes) for r in predictions.rows)
                writer = csv.writer(out)
                writer.writerow(["path", "label", *(f"{name}_{i}" for i in range(1, k + 1)
                                                    for name in ("class", "probability"))])
                for r in predictions.rows:
                    writer.writerow([r.path, r.label or "", *(v for pair in zip(r.classes, r.probabilities)
                                                              for v in pair)])
            else:
                for r in predictions.rows:
                    out.write(json.dumps(asdict(r)) + "\n")
    except OSError as error:
        raise UserError(f"cannot write {path} ({error.strerror or error}); pass a writable --out") from None


def format_prediction(row: Prediction) -> str:
    return f"{row.path}: " + ", ".join(f"{c} {p:.1%}" for c, p in zip(row.classes, row.probabilities))


def format_confusion(classes: Sequence[str], matrix: list[list[int]]) -> str:
    """The confusion matrix as a text table: a row per true class, a column per predicted one."""
    width = max(6, *(len(c) for c in classes), *(len(str(v)) for row in matrix for v in row))
    lines = [" " * width + " " + " ".join(f"{c[:width]:>{width}}" for c in classes)]
    lines += [f"{c:>{width}} " + " ".join(f"{v:>{width}}" for v in row) for c, row in zip(classes, matrix)]
    return "\n".join(lines)

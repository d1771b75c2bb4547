"""`predict`: image files read as training reads them, top-k per image, accuracy on a folder equal to `best`'s."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLASSES
from data import load_images, normalize
from data.imagefolder import list_imagefolder
from search.cli import main
from search.errors import UserError
from search.predict import Preprocess, predict, write_predictions
from search.records import BestResult


def _logreg(image_size: int, seed: int = 0) -> torch.nn.Module:
    from search.family import get_family

    torch.manual_seed(seed)
    return get_family("logreg").create_model({}, num_classes=len(TINY_CLASSES), image_size=image_size).eval()


def _best_evaluation(model: torch.nn.Module, images, device=torch.device("cpu")):
    """What `best` computes on a test part: search.training.evaluate over the fixed-shape padded batches."""
    from search.pipeline import fixed_eval_batches
    from search.training import evaluate

    batches = ((normalize(x), y, n) for x, y, n in fixed_eval_batches(images, device))
    return evaluate(model, batches, torch.nn.functional.cross_entropy, device)


@pytest.fixture(scope="module")
def mixed_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/train and DIR/test of JPEGs and PNGs of several sizes and modes (grey, RGBA, palette)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    shapes = [(48, 64), (100, 100), (32, 32), (37, 91), (240, 180)]
    for part in ("train", "test"):
        for label, name in enumerate(("a", "b")):
            folder = root / part / name
            folder.mkdir(parents=True)
            for index, (h, w) in enumerate(shapes):
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                picture = Image.fromarray(pixels)
                if index == 1:
                    picture = picture.convert("L")
                if index == 3:
                    picture = picture.convert("RGBA")
                if index == 4:
                    picture = picture.convert("P")
                suffix = ".png" if index in (3, 4) else ".jpg"
                picture.save(folder / f"{index:02d}{suffix}")
    return root


@pytest.mark.parametrize("size", [16, 24, 32, 96])
def test_preprocess_reads_each_file_bit_for_bit_as_the_test_set_that_best_scores(mixed_imagefolder: Path,
                                                                                 tiny_imagefolder: Path,
                                                                                 size: int) -> None:
    """load_images decodes a part in chunks, resizing equal shapes as one batch; predict reads whatever files it
    gets, one by one or in other groups. JPEG draft mode, grey/RGBA/palette conversion and the resize agree."""
    for root in (mixed_imagefolder, tiny_imagefolder):
        expected = load_images("imagefolder", root, "test", size).images
        listing = list_imagefolder(root, "test")
        paths = [root / "test" / f for f in listing.files]
        preprocess = Preprocess(size)
        one_by_one = torch.cat([preprocess.read([p])[0] for p in paths])
        together, kept, problems = preprocess.read(paths[::-1])
        assert torch.equal(one_by_one, expected)
        assert torch.equal(together.flip(0), expected) and kept == list(range(len(paths))) and problems == []


def test_predict_gives_the_accuracy_and_predictions_of_bests_test_evaluation(tiny_imagefolder: Path) -> None:
    model = _logreg(16)
    test = load_images("imagefolder", tiny_imagefolder, "test", 16)
    evaluation = _best_evaluation(model, test)

    found = predict(model, tiny_imagefolder / "test", top_k=4, preprocess=Preprocess(16), classes=TINY_CLASSES)

    assert [TINY_CLASSES.index(r.classes[0]) for r in found.rows] == evaluation.predictions.tolist()
    assert [TINY_CLASSES.index(r.label) for r in found.rows] == test.labels.tolist()
    assert found.accuracy == evaluation.accuracy
    from search.best import confusion_matrix

    assert found.confusion_matrix == confusion_matrix(test.labels, evaluation.predictions, len(TINY_CLASSES))
    logits = model(normalize(test.images))
    probabilities = logits.softmax(1).topk(4)
    assert np.allclose([r.probabilities for r in found.rows], probabilities.values.detach().numpy(), atol=1e-6)
    assert all(sorted(r.classes) == sorted(TINY_CLASSES) for r in found.rows)  # top 4 of 4: each class once


def test_batches_of_any_size_give_the_same_predictions(tiny_imagefolder: Path) -> None:
    model = _logreg(16)
    runs = [predict(model, tiny_imagefolder / "test", preprocess=Preprocess(16), classes=TINY_CLASSES, batch_size=b)
            for b in (1, 5, 64)]
    for run in runs[1:]:
        assert [(r.path, r.classes) for r in run.rows] == [(r.path, r.classes) for r in runs[0].rows]
        assert np.allclose([r.probabilities for r in run.rows], [r.probabilities for r in runs[0].rows], atol=1e-6)
        assert run.confusion_matrix == runs[0].confusion_matrix


def test_a_file_that_cannot_be_read_is_one_line_and_the_rest_are_predicted(tiny_imagefolder: Path,
                                                                         tmp_path: Path) -> None:
    folder = tmp_path / "images"
    shutil.copytree(tiny_imagefolder / "test", folder)
    (folder / "circle" / "notes.jpg").write_text("not an image")
    truncated = (folder / "cross" / "000.png").read_bytes()[:60]
    (folder / "cross" / "zzz.png").write_bytes(truncated)
    lines: list[str] = []

    found = predict(_logreg(16), folder, preprocess=Preprocess(16), classes=TINY_CLASSES, batch_size=4,
                    log=lines.append)

    assert len(found.rows) == 24 and len(found.skipped) == 2
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert any("notes.jpg" in line for line in lines) and any("zzz.png" in line for line in lines)
    assert sum(map(sum, found.confusion_matrix)) == 24


def test_files_without_a_class_layout_get_predictions_but_no_accuracy(tiny_imagefolder: Path, tmp_path: Path) -> None:
    loose = [tiny_imagefolder / "test" / "circle" / "000.png", tiny_imagefolder / "test" / "cross" / "001.png"]
    found = predict(_logreg(16), loose, top_k=2, preprocess=Preprocess(16), classes=TINY_CLASSES)
    assert [r.path for r in found.rows] == [str(p) for p in loose]
    assert found.accuracy is None and found.confusion_matrix is None and all(r.label is None for r in found.rows)

    other = tmp_path / "other"
    shutil.copytree(tiny_imagefolder / "test" / "circle", other / "dogs")
    lines: list[str] = []
    found = predict(_logreg(16), other, preprocess=Preprocess(16), classes=TINY_CLASSES, log=lines.append)
    assert len(found.rows) == 6 and found.accuracy is None
    assert lines == [f"no accuracy: the class folders dogs of {other} are not classes of the model "
                     f"({', '.join(TINY_CLASSES)})"]


def test_predictions_are_written_as_csv_and_json_lines(tiny_imagefolder: Path, tmp_path: Path) -> None:
    found = predict(_logreg(16), tiny_imagefolder / "test", top_k=2, preprocess=Preprocess(16), classes=TINY_CLASSES)
    write_predictions(found, tmp_path / "p.csv")
    write_predictions(found, tmp_path / "p.jsonl")
    with open(tmp_path / "p.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["path", "label", "class_1", "probability_1", "class_2", "probability_2"]
    assert [(r["path"], r["label"], r["class_1"], float(r["probability_2"])) for r in rows] == [
        (r.path, r.label, r.classes[0], r.probabilities[1]) for r in found.rows]
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines == [{"path": r.path, "classes": r.classes, "probabilities": r.probabilities, "label": r.label}
                     for r in found.rows]
    with pytest.raises(UserError, match=r"\.csv or \.jsonl"):
        write_predictions(found, tmp_path / "p.txt")


@pytest.mark.parametrize("argv, message", [
    (["predict", "x.jpg"], "predict takes --bundle DIR, or --model M"),
    (["predict", "--bundle", "b", "--model", "logreg", "x.jpg"], "predict takes --bundle DIR, or --model M"),
    (["predict", "--bundle", "b"], "predict takes image files, or --folder DIR"),
    (["predict", "--bundle", "nowhere", "x.jpg"], "nowhere is not a model bundle (no config.json)"),
])
def test_a_wrong_predict_command_is_one_line(argv: list[str], message: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 2
    assert message in err.getvalue() and err.getvalue().count("\n") == 1


@pytest.mark.slow
def test_predict_on_the_shared_cifar_test_folder_gives_bests_test_accuracy_exactly(shared_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """A logreg searched and retrained on the shared folder (1 trial, 1 epoch, 64px: its images are 32px, so
    resized), then `predict --folder` through the stored best and through an exported bundle: the accuracy and
    confusion matrix are `best`'s, to the image."""
    import optuna

    root = shared_dir / "datasets" / "cifar10-stl10-sized"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    data = ["--dataset", "imagefolder", "--data-root", str(root), "--image-size", "64",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(["search", "--model", "logreg", "--n-trials", "1", "--workers", "1", "--gpus", "none",
                 "--param", "epochs=1", "--param", "batch_size=256", "--storage", url,
                 "--log-dir", str(tmp_path / "logs"), *data]) == 0
    assert main(["best", "--model", "logreg", "--storage", url, "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu"]) == 0
    stored = BestResult.load(optuna.load_study(study_name="logreg", storage=url)).to_json()
    tested = load_images("imagefolder", root, "test", 64, tmp_path / "cache")  # what best scored, from its cache
    listing = list_imagefolder(root, "test")
    assert torch.equal(Preprocess(64).read([root / "test" / f for f in listing.files])[0], tested.images)
    assert main(["export", "--model", "logreg", "--storage", url, "--out", str(tmp_path / "bundles"),
                 "--format", "safetensors"]) == 0

    for source in (["--model", "logreg", "--storage", url], ["--bundle", str(tmp_path / "bundles" / "logreg")]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["predict", *source, "--folder", str(root / "test"), "--device", "cpu",
                         "--out", str(tmp_path / "predictions.csv")]) == 0
        correct = round(stored["test_accuracy"] * stored["test_images"])
        assert f"({correct:,} of {stored['test_images']:,} images right)" in out.getvalue()
        with open(tmp_path / "predictions.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        from search.best import confusion_matrix

        classes = stored["classes"]
        matrix = confusion_matrix(torch.tensor([classes.index(r["label"]) for r in rows]),
                                  torch.tensor([classes.index(r["class_1"]) for r in rows]), len(classes))
        assert matrix == stored["confusion_matrix"]

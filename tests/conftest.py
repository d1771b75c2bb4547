"""Shared fixtures: a tiny ImageFolder dataset built in well under a second, and a data config for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_CLASSES = ("circle", "cross", "horizontal", "vertical")
TINY_SIZE = 32
TINY_COUNTS = {"train": 12, "test": 6}  # images per class
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = (REPO_ROOT / ".." / "shared").resolve()


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: tests use tiny tensors, where threads only add overhead, and on a busy machine
    OpenMP threads spinning for a core make a 10 ms step take 500 ms. Processes that tests start are unaffected.
    """
    torch.set_num_threads(1)


def _tiny_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 RGB uint8 picture whose colour and pattern depend on its class, plus noise and a random shift."""
    size = TINY_SIZE
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    shift = rng.integers(-3, 4, size=2)
    y, x = y - shift[0], x - shift[1]
    centre = (size - 1) / 2
    if label == 0:
        mask = (x - centre) ** 2 + (y - centre) ** 2 < (size / 4) ** 2
    elif label == 1:
        mask = (np.abs(x - centre) < 3) | (np.abs(y - centre) < 3)
    elif label == 2:
        mask = (y // 4) % 2 == 0
    else:
        mask = (x // 4) % 2 == 0
    colour = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]][label % 4], dtype=np.float32)
    image = np.where(mask[..., None], colour, 255 - colour) * 0.8
    image += rng.normal(0, 15, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/train/<class>/*.png (12 per class) and DIR/test/<class>/*.png (6 per class); 4 classes, 32x32 RGB.

    Read-only for tests: copy it before changing anything in it.
    """
    root = tmp_path_factory.mktemp("tiny_imagefolder")
    rng = np.random.default_rng(0)
    for part, count in TINY_COUNTS.items():
        for label, name in enumerate(TINY_CLASSES):
            folder = root / part / name
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(_tiny_image(label, rng)).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture
def tiny_config(tiny_imagefolder: Path, tmp_path: Path):
    """A DataConfig for `tiny_imagefolder` at 32px, random MobileNetV2 weights, a cache in this test's tmp_path."""
    from search.pipeline import DataConfig

    return DataConfig(
        dataset="imagefolder",
        data_root=tiny_imagefolder,
        image_size=TINY_SIZE,
        cache_dir=tmp_path / "cache",
        weights="none",
    )


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder next to the repository (SPEC.md, weights, datasets); the test is skipped without it."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared folder {SHARED_DIR} is absent")
    return SHARED_DIR


class TinySearch:
    """Searches of logreg on `tiny_imagefolder` through the real command line: 16px images, 2-epoch trials."""

    def __init__(self, data_root: Path, folder: Path) -> None:
        self.data_root, self.folder = data_root, folder
        self.cache_dir = folder / "cache"
        self.sqlite_url = f"sqlite:///{folder / 'studies.db'}"
        self.processes: list = []

    def data_args(self) -> list[str]:
        return ["--dataset", "imagefolder", "--data-root", str(self.data_root), "--image-size", "16",
                "--cache-dir", str(self.cache_dir)]

    def create(self, url: str, n_trials: int, *extra: str) -> None:
        """Create the study in this process (`search --workers 0`); later `--param`s win over epochs=2."""
        from search.cli import main

        assert main(["search", "--model", "logreg", "--workers", "0", "--storage", url, "--n-trials", str(n_trials),
                     "--param", "epochs=2", *self.data_args(), *extra]) == 0

    def start_worker(self, url: str, *extra: str, name: str = "worker"):
        """`python -m search.cli worker` on the CPU with one thread; its output goes to FOLDER/NAME.log. Its
        trials run alone unless `extra` says --pack (logreg's default on the CPU is packs of 8)."""
        import subprocess
        import sys

        alone = [] if "--pack" in extra else ["--pack", "1"]
        command = [sys.executable, "-m", "search.cli", "worker", "--model", "logreg", "--storage", url,
                   "--device", "cpu", "--threads", "1", "--cache-dir", str(self.cache_dir), *alone, *extra]
        with open(self.folder / f"{name}.log", "w") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def output(self, name: str = "worker") -> str:
        return (self.folder / f"{name}.log").read_text()

    def trials(self, url: str, study: str = "logreg") -> list:
        import optuna

        from search.storage import open_storage

        return optuna.load_study(study_name=study, storage=open_storage(url)).get_trials(deepcopy=False)

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def tiny_search(tiny_imagefolder: Path, tmp_path: Path):
    """A TinySearch in this test's tmp_path; worker processes it started and left running are killed after the test."""
    search = TinySearch(tiny_imagefolder, tmp_path)
    yield search
    search.stop_all()


@pytest.fixture
def feature_computations(monkeypatch: pytest.MonkeyPatch) -> list:
    """An empty in-process feature cache, and a list that grows by one per backbone pass over a set of images."""
    import search.features

    monkeypatch.setattr(search.features, "MEMORY", search.features.FeatureMemory())
    calls: list = []
    compute = search.features.compute_features

    def counting(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(search.features, "compute_features", counting)
    return calls

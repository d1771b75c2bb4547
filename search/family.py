"""A model family: one entry holds everything the service knows of one kind of network.

The builder, the search space (each parameter with its default, limits and condition), the hand-found
reference setting and the study's figures, the default budgets and image size. Validation, the params a
setting reads, the CLI's help and the report's reference columns all derive from it.

Families are registered the same way whatever their origin: the modules of `search/families/` (built in),
the entry-point group `stl10_search.families` of installed packages, or a file given with `--family-file`.
A file or module registers every `Family` it defines at module level.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from search.errors import USER_ERRORS, FamilyError, UserError
from search.families import ENTRY_POINT_GROUP
from search.space import Dim, customize, relevant
from search.training import check_outputs

Builder = Callable[[dict[str, Any], int, int, "str | None"], nn.Module]  # (params, num_classes, image_size, weights)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One kind of network and how to search it.

    `build(params, num_classes, image_size, weights)` returns the network; `weights` is the --weights value
    for a `pretrained` family, else None. `space` lists every hyperparameter, the training ones included
    (`search.training.training_space`). `reference` is the hand-found setting, over the space's defaults: the
    defaults of `train` and the first trial of `--enqueue-reference`. `time_budget` is the seconds of search
    `run` gives the family when the user sets no budget, per device type. `pack_members` names the parameters
    that may differ between the members of a trial pack (`search.pack`): every other parameter (shapes, batch
    size, image size, epochs, augmentation) is shared by a pack, whose members train as one stacked model on one
    batch stream. A family that names none trains in packs of one.
    """

    name: str
    title: str
    build: Builder
    space: tuple[Dim, ...]
    reference: dict[str, Any] = field(default_factory=dict)
    study_results: dict[str, Any] | None = None  # the hand-tuned study's figures on STL-10, where it had them
    image_size: int = 64
    pretrained: bool = False
    n_trials: int = 20
    time_budget: dict[str, float] = field(default_factory=lambda: {"cpu": 600.0, "cuda": 300.0})
    cudnn_benchmark: bool = True
    pack_members: tuple[str, ...] = ()
    order: int = 100
    origin: str = "built-in"

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", tuple(self.space))
        object.__setattr__(self, "pack_members", tuple(self.pack_members))
        names = [d.name for d in self.space]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        unknown = sorted(set(self.reference) - set(names))
        unpackable = sorted(set(self.pack_members) - set(names))
        if duplicated or unknown or unpackable:
            raise UserError(f"family {self.name} ({self.origin}): "
                            + (f"parameters declared twice: {', '.join(duplicated)}" if duplicated
                               else f"reference names unknown parameters: {', '.join(unknown)}" if unknown
                               else f"pack_members names unknown parameters: {', '.join(unpackable)}"))

    def dims(self, overrides: dict[str, Any] | None = None) -> list[Dim]:
        """The space, with a user's fixed, narrowed or restricted dimensions."""
        return customize(self.name, list(self.space), overrides or {})

    def defaults(self) -> dict[str, Any]:
        return {d.name: d.default for d in self.space}

    def relevant(self, params: dict[str, Any]) -> dict[str, Any]:
        """Only what a setting reads (no momentum under Adam); see `search.space.relevant`."""
        return relevant(list(self.space), params)

    def resolve(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The reference setting with `overrides` on top, checked; an unknown name or bad value is a UserError."""
        overrides = overrides or {}
        unknown = sorted(set(overrides) - {d.name for d in self.space})
        if unknown:
            raise UserError(f"unknown parameter {', '.join(unknown)} for model {self.name}; "
                            f"known: {', '.join(sorted(d.name for d in self.space))}")
        params = self.relevant({**self.defaults(), **self.reference, **overrides})
        self.validate(params)
        return params

    def validate(self, params: dict[str, Any]) -> None:
        """Every parameter this setting reads is present and a value the code can run with."""
        for dim in self.space:
            if not dim.active(params):
                continue
            if dim.name not in params:
                raise UserError(f"model {self.name}: parameter {dim.name} is missing")
            dim.check(params[dim.name])

    def pack_shared(self, params: dict[str, Any]) -> dict[str, Any]:
        """What the members of one trial pack must agree on: every parameter but `pack_members`."""
        return {name: value for name, value in params.items() if name not in self.pack_members}

    def reference_trial(self, dims: list[Dim]) -> dict[str, Any]:
        """The reference setting restricted to what `dims` allow, for enqueueing as a first trial."""
        reference = self.resolve()
        return {d.name: reference[d.name] for d in dims if d.name in reference and d.contains(reference[d.name])}

    def create_model(self, params: dict[str, Any], *, num_classes: int = 10, image_size: int | None = None,
                     weights: str | None = None) -> nn.Module:
        """The network for `params`; missing parameters take the reference setting's values.

        A builder that raises anything but a user error (a bad value, missing weights) is a FamilyError naming
        the family and where it was defined: the fault is in the family, not in the search.
        """
        merged = self.relevant({**self.defaults(), **self.reference, **params})
        try:
            return self.build(merged, num_classes, image_size or self.image_size, weights if self.pretrained else None)
        except USER_ERRORS:
            raise
        except Exception as error:  # noqa: BLE001 - a family's own code: one line naming it
            raise FamilyError(f"model family {self.name} ({self.origin}): building the model failed: "
                              f"{type(error).__name__}: {error}") from None

    def check(self, params: dict[str, Any], *, num_classes: int, image_size: int, weights: str | None) -> None:
        """Build the model for `params` and run one batch of two images through it on the CPU.

        Run once before any worker starts: a builder or forward pass that fails, or an output that is not
        [batch, num_classes], is a FamilyError, instead of failed trials or trials that complete with a
        meaningless accuracy. Building with `weights` also fetches them once (a download, for "imagenet").
        """
        model = self.create_model(params, num_classes=num_classes, image_size=image_size, weights=weights).eval()
        images = torch.randn(2, 3, image_size, image_size)
        try:
            with torch.inference_mode():
                outputs = model(images)
        except USER_ERRORS:
            raise
        except Exception as error:  # noqa: BLE001 - the family's forward pass
            raise FamilyError(f"model family {self.name} ({self.origin}): its model fails on a batch of "
                              f"{image_size}x{image_size} images: {type(error).__name__}: {error}") from None
        check_outputs(outputs, 2, num_classes, f"model family {self.name} ({self.origin})")

    def size_for(self, params: dict[str, Any], configured: int | None = None) -> int:
        """Input side in pixels: a searched `image_size`, else the configured one, else the family's own."""
        return int(params.get("image_size") or configured or self.image_size)


# --- the registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, Family] = {}
_FILES: dict[Path, list[str]] = {}
_builtins_loaded = False


def register(family: Family) -> Family:
    """Add a family; a second family under a taken name is a UserError (the same one again is fine)."""
    taken = _REGISTRY.get(family.name)
    if taken is not None and taken is not family and taken.origin != family.origin:
        raise UserError(f"model family {family.name!r} from {family.origin} clashes with the one from {taken.origin}; "
                        "rename one of them")
    _REGISTRY[family.name] = family
    return family


def _module_families(module: ModuleType, origin: str) -> list[Family]:
    found = [value for value in vars(module).values() if isinstance(value, Family)]
    return [family if family.origin == origin else _with_origin(family, origin) for family in found]


def _with_origin(family: Family, origin: str) -> Family:
    from dataclasses import replace

    return replace(family, origin=origin)


def _load_builtins() -> None:
    """The modules of search/families/ and the installed packages' entry points, once per process."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import search.families as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue  # shared helpers of several families
        for family in _module_families(importlib.import_module(f"{package.__name__}.{info.name}"), "built-in"):
            register(family)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as error:  # noqa: BLE001 - a broken plug-in must not take the built-in families down
            _log.warning("model family entry point %s (%s) failed to load: %s", entry.name, entry.value, error)
            continue
        origin = f"entry point {entry.value}"
        found = [loaded] if isinstance(loaded, Family) else (
            _module_families(loaded, origin) if isinstance(loaded, ModuleType) else [])
        for family in found:
            register(_with_origin(family, origin) if family.origin != origin else family)


def load_family_file(path: Path | str) -> list[str]:
    """Import a Python file and register the families it defines; returns their names."""
    path = Path(path).expanduser().resolve()
    if path in _FILES:
        return _FILES[path]
    _load_builtins()
    if not path.is_file():
        raise UserError(f"family file {path} does not exist")
    module_name = f"stl10_search_family_{abs(hash(path)):x}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"family file {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's file: say where it broke, in one line
        raise UserError(f"family file {path} failed to load: {type(error).__name__}: {error}") from None
    families = _module_families(module, str(path))
    if not families:
        raise UserError(f"family file {path} defines no Family; see the README's \"Your own model\" section")
    _FILES[path] = [register(family).name for family in families]
    return _FILES[path]


def families() -> dict[str, Family]:
    """Every registered family, in the study's order (built-in first), then by name."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


def get_family(name: str) -> Family:
    known = families()
    if name not in known:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(known)}")
    return known[name]


def parse_families(text: str) -> list[str]:
    """"all" or a comma-separated list of registered family names."""
    known = families()
    names = list(known) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"unknown model {', '.join(unknown) or repr(text)}; choose from all, {', '.join(known)}")
    return names

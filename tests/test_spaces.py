"""search/space.py and the families' spaces: each holds what the study tried by hand; users fix, narrow or restrict it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial

from search.errors import UserError
from search.families.mlp import MAX_LAYERS as MAX_MLP_LAYERS
from search.family import families, get_family
from search.space import load_space_file, suggest
from search.studies import StudySettings, create_or_update, load_settings

FAMILIES = families()


def build_space(family: str, file_overrides: dict | None = None, cli_overrides: dict | None = None) -> list:
    """The space as a study builds it: the space file's table, then the command line's."""
    from search.space import customize

    return customize(family, get_family(family).dims(file_overrides), cli_overrides or {})


def resolve_params(family: str, overrides: dict) -> dict:
    return get_family(family).resolve(overrides)


def reference_trial(family: str, dims: list) -> dict:
    return get_family(family).reference_trial(dims)

optuna.logging.set_verbosity(optuna.logging.WARNING)

_TRAINING_BY_HAND = {"optimizer": ["adam", "sgd", "rmsprop"], "loss": ["cross_entropy", "nll"],
                     "flip_p": [0.5], "max_rotation": [8.0]}

# SPEC.md, "The five models and the space explored by hand": every value named there, per parameter.
EXPLORED_BY_HAND: dict[str, dict[str, list]] = {
    "logreg": {**_TRAINING_BY_HAND, "lr": [1e-5, 1e-4, 1e-3, 3e-2], "batch_size": [32, 64, 128, 512],
               "weight_decay": [5e-6, 5e-4, 5e-3]},
    "mlp": {
        **_TRAINING_BY_HAND,
        "n_layers": [3, 4, 5],
        **{f"width_{i}": [4096, 2048, 1024, 512, 256, 216, 128] for i in range(1, 6)},
        **{f"dropout_{i}": [0.01, 0.1, 0.2] for i in range(1, 6)},
        "batch_norm": [True],
        "weight_decay": [1e-4, 5e-3], "lr": [5e-4, 1e-3, 3e-3], "batch_size": [256, 512, 1024],
    },
    "cnn": {
        **_TRAINING_BY_HAND,
        "n_conv": [2, 3],
        **{f"channels_{i}": [6, 12, 24, 42, 100, 120, 140] for i in range(1, 4)},
        **{f"pool_{i}": [2, 4, 8] for i in range(1, 4)},
        "pool_type": ["max", "avg"], "kernel_size": [3],
        "fc1": [200, 300], "fc2": [100, 200], "dropout": [0.003, 0.1],
        "weight_decay": [1e-4, 3e-2], "lr": [1e-4, 1e-2], "batch_size": [16, 32, 64, 128, 256, 512],
    },
    "mobilenet_frozen": {
        **_TRAINING_BY_HAND,
        "fc1": [150, 200, 400], "fc2": [50, 100, 150], "dropout": [0.01, 0.1],
        "weight_decay": [5e-5, 5e-3], "lr": [1e-4, 5e-3], "batch_size": [32, 64, 128, 256, 512],
    },
    "mobilenet_finetune": {
        **_TRAINING_BY_HAND,
        "fc1": [150, 400], "fc2": [30, 150], "dropout": [0.01, 0.1],
        "weight_decay": [1e-4, 1e-3], "lr": [5e-4, 5e-3], "batch_size": [64, 128, 256, 512, 1024],
    },
}
EPOCHS_BY_HAND = {"logreg": [20, 40, 60], "mlp": [20, 50], "cnn": [20, 60], "mobilenet_frozen": [20, 50],
                  "mobilenet_finetune": [20, 50]}


def _dims(family: str, overrides: dict | None = None) -> dict:
    return {d.name: d for d in build_space(family, overrides)}


def test_the_five_families_of_the_study_are_built_in_each_named_as_its_module() -> None:
    """Others may be added beside them; the command line lists built-in names from the module names."""
    import pkgutil

    import search.families

    assert set(EXPLORED_BY_HAND) <= set(FAMILIES)
    modules = {i.name for i in pkgutil.iter_modules(search.families.__path__) if not i.name.startswith("_")}
    assert modules == {name for name in FAMILIES if get_family(name).origin == "built-in"}


@pytest.mark.parametrize("family", list(EXPLORED_BY_HAND))
def test_every_value_explored_by_hand_lies_in_the_space(family: str) -> None:
    dims = _dims(family)
    outside = [(name, value) for name, values in EXPLORED_BY_HAND[family].items() for value in values
               if not dims[name].contains(value)]
    assert outside == []


@pytest.mark.parametrize("family", list(EPOCHS_BY_HAND))
def test_epochs_are_a_budget_that_covers_every_run_length_tried_by_hand(family: str) -> None:
    """A trial gets up to the budget's epochs; pruning (Hyperband from 1 epoch) decides how many it uses."""
    assert StudySettings(family, n_trials=1).max_epochs() >= max(EPOCHS_BY_HAND[family])


def test_fixing_a_parameter_leaves_one_value() -> None:
    dims = _dims("logreg", {"lr": 1e-3, "optimizer": "sgd", "epochs": 2})
    assert (dims["lr"].low, dims["lr"].high, dims["lr"].log) == (1e-3, 1e-3, False)
    assert dims["optimizer"].choices == ("sgd",)
    assert dims["epochs"].low == dims["epochs"].high == 2
    params = suggest(FixedTrial({"lr": 1e-3, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-4,
                                 "batch_size": 64, "loss": "nll", "epochs": 2, "flip_p": 0.0,
                                 "max_rotation": 0.0, "lr_schedule": "constant", "warmup_epochs": 0, "translate": 0.0, "cutout": 0.0}),
        list(dims.values()))
    assert params["lr"] == 1e-3 and params["epochs"] == 2


@pytest.mark.parametrize("spec", [{"low": 1e-4, "high": 1e-3}, "1e-4..1e-3"])
def test_narrowing_a_range_keeps_its_log_scale(spec) -> None:
    lr = _dims("logreg", {"lr": spec})["lr"]
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-3, True)


def test_narrowing_an_integer_range_and_choosing_linear_scale() -> None:
    dims = _dims("cnn", {"n_conv": "2..3", "fc1": {"low": 100, "high": 300, "log": False}})
    assert (dims["n_conv"].low, dims["n_conv"].high) == (2, 3)
    assert (dims["fc1"].low, dims["fc1"].high, dims["fc1"].log) == (100, 300, False)


def test_a_list_restricts_choices_or_turns_a_range_into_choices() -> None:
    dims = _dims("cnn", {"optimizer": ["adam", "sgd"], "batch_size": [32, 64], "lr": [1e-3, 3e-3]})
    assert dims["optimizer"].choices == ("adam", "sgd")
    assert dims["batch_size"].choices == (32, 64)
    assert dims["lr"].choices == (1e-3, 3e-3) and dims["lr"].low is None


def test_the_original_space_is_not_changed_by_customizing() -> None:
    before = list(get_family("logreg").space)
    build_space("logreg", {"lr": 1e-3}, {"optimizer": ["adam"]})
    assert list(get_family("logreg").space) == before


def test_command_line_overrides_come_after_the_space_file() -> None:
    lr = {d.name: d for d in build_space("logreg", {"lr": "1e-4..1e-2"}, {"lr": 3e-3})}["lr"]
    assert lr.low == lr.high == 3e-3


@pytest.mark.parametrize("overrides, message", [
    ({"no_such_param": 1}, "unknown parameter no_such_param"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "empty range"),
    ({"lr": "1e-2..1e-4"}, "empty range"),
    ({"batch_size": []}, "empty list"),
    ({"optimizer": "1..2"}, "choice"),
    ({"lr": "fast"}, "numeric"),
    ({"lr": {"low": 0, "high": 1e-2}}, "log range needs low > 0"),
    ({"n_conv": 2.5}, "integer"),
    ({"lr": {"low": 1e-4}}, "a range is"),
    ({"optimizer": "adamx"}, "unknown value 'adamx'"),
    ({"pool_type": ["max", "median"]}, "unknown value 'median'"),
])
def test_bad_overrides_are_user_errors(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_space("cnn", overrides)


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        build_space("resnet")


def test_unknown_parameter_in_resolved_params_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown parameter widht_1"):
        resolve_params("mlp", {"widht_1": 128})


def test_space_file_survives_a_round_trip_through_the_study(tmp_path: Path) -> None:
    """A TOML file -> the study's stored settings -> the dims every worker rebuilds from storage."""
    space_file = tmp_path / "space.toml"
    space_file.write_text(
        '[logreg]\nlr = {low = 1e-4, high = 1e-3}\nepochs = 3\noptimizer = ["adam", "sgd"]\nmomentum = "0.8..0.9"\n'
        "[cnn]\nn_conv = 2\nbatch_size = [32, 64]\n"
    )
    tables = load_space_file(space_file, FAMILIES)
    assert tables["logreg"]["epochs"] == 3 and tables["cnn"]["batch_size"] == [32, 64]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'studies.db'}")
    for family, table in tables.items():
        create_or_update(storage, family, StudySettings(family=family, n_trials=3, space=table))
    for family, table in tables.items():
        stored = load_settings(optuna.load_study(study_name=family, storage=storage))
        assert stored.dims() == build_space(family, table)
    logreg = {d.name: d for d in load_settings(optuna.load_study(study_name="logreg", storage=storage)).dims()}
    assert (logreg["lr"].low, logreg["lr"].high) == (1e-4, 1e-3)
    assert (logreg["momentum"].low, logreg["momentum"].high) == (0.8, 0.9)
    assert logreg["optimizer"].choices == ("adam", "sgd")
    assert logreg["epochs"].low == logreg["epochs"].high == 3


@pytest.mark.parametrize("content, message", [
    ("[resnet]\nlr = 1e-3\n", "unknown model 'resnet'"),
    ("[logreg\nlr = 1e-3\n", "not valid TOML"),
    ("logreg = 3\n", "must be a table"),
])
def test_bad_space_files_are_user_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "space.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_space_file(path, FAMILIES)


def test_missing_space_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_space_file(tmp_path / "nope.toml", FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_trial_lies_within_the_space(family: str) -> None:
    dims = build_space(family)
    reference = reference_trial(family, dims)
    by_name = {d.name: d for d in dims}
    assert reference and set(reference) <= set(by_name)
    assert all(by_name[name].contains(value) for name, value in reference.items())
    assert {"lr", "optimizer", "batch_size"} <= set(reference)


def test_reference_trial_drops_values_a_narrowed_space_excludes() -> None:
    assert get_family("logreg").reference["lr"] == 1e-4
    reference = reference_trial("logreg", build_space("logreg", {"lr": "1e-3..1e-2", "epochs": 2}))
    assert "lr" not in reference and "epochs" not in reference
    assert reference["optimizer"] == "adam"


def _mlp_fixed(n_layers: int) -> dict:
    values = {"n_layers": n_layers, "batch_norm": True, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4,
              "batch_size": 256, "loss": "cross_entropy", "epochs": 50, "flip_p": 0.5, "max_rotation": 8.0,
              "lr_schedule": "cosine", "warmup_epochs": 1, "translate": 0.05, "cutout": 0.2}
    values.update({f"width_{i}": 2 ** (12 - i) for i in range(1, n_layers + 1)})
    values.update({f"dropout_{i}": 0.1 for i in range(1, n_layers + 1)})
    return values


@pytest.mark.parametrize("n_layers", [3, 4, 5])
def test_fixed_trial_asks_for_a_layer_only_when_the_net_has_it(n_layers: int) -> None:
    """FixedTrial raises for a parameter it was not given, so a 3-layer net must not ask for width_4."""
    params = suggest(FixedTrial(_mlp_fixed(n_layers)), build_space("mlp"))
    assert {f"width_{i}" for i in range(1, MAX_MLP_LAYERS + 1)} & set(params) == {
        f"width_{i}" for i in range(1, n_layers + 1)}
    assert "momentum" not in params and "label_smoothing" not in params  # adam, plain cross entropy


def test_sampled_trials_cover_the_conditional_parameters() -> None:
    mlp_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cnn_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    mlp, cnn = build_space("mlp"), build_space("cnn")
    seen_layers, seen_convs = set(), set()
    for _ in range(40):
        trial = mlp_study.ask()
        params = suggest(trial, mlp)
        layers = params["n_layers"]
        seen_layers.add(layers)
        assert all((f"width_{i}" in params) == (i <= layers) for i in range(1, MAX_MLP_LAYERS + 1))
        assert all((f"dropout_{i}" in params) == (i <= layers) for i in range(1, MAX_MLP_LAYERS + 1))
        assert ("momentum" in params) == (params["optimizer"] in ("sgd", "rmsprop"))
        assert ("label_smoothing" in params) == (params["loss"] == "label_smoothing")
        mlp_study.tell(trial, 0.0)
        trial = cnn_study.ask()
        params = suggest(trial, cnn)
        seen_convs.add(params["n_conv"])
        assert all((f"channels_{i}" in params) == (i <= params["n_conv"]) for i in range(1, 5))
        assert all((f"pool_{i}" in params) == (i <= params["n_conv"]) for i in range(1, 5))
        cnn_study.tell(trial, 0.0)
    assert seen_layers == set(range(3, MAX_MLP_LAYERS + 1))
    assert seen_convs == {2, 3, 4}

"""How a study proposes settings (samplers) and stops hopeless trials early (pruners), each registered once.

A study stores the names; every worker builds its own sampler (seeded per worker) and the study's pruner
from them. Optuna is imported only when one is built, so the command line lists the choices cheaply.
"""

from __future__ import annotations

from typing import Any

from search.registry import Registry

SAMPLERS: Registry[Any] = Registry("sampler")
PRUNERS: Registry[Any] = Registry("pruner")


@SAMPLERS.register("tpe", "multivariate TPE with a constant liar, so parallel workers spread out")
def _tpe(seed: int, n_trials: int | None) -> Any:
    import optuna

    startup = max(4, min(10, (n_trials or 40) // 4))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup)


@SAMPLERS.register("random", "uniform random settings")
def _random(seed: int, n_trials: int | None) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("gp", "Gaussian-process Bayesian optimisation (best for small budgets)")
def _gp(seed: int, n_trials: int | None) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


@PRUNERS.register("hyperband", "Hyperband over the epoch budget, reduction factor 3")
def _hyperband(max_epochs: int) -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3)


@PRUNERS.register("halving", "successive halving, reduction factor 3")
def _halving(max_epochs: int) -> Any:
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


@PRUNERS.register("median", "stop a trial below the median of earlier trials at the same epoch")
def _median(max_epochs: int) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)


@PRUNERS.register("none", "no pruning: every trial runs its whole epoch budget")
def _none(max_epochs: int) -> Any:
    import optuna

    return optuna.pruners.NopPruner()


def make_sampler(kind: str, seed: int, n_trials: int | None) -> Any:
    """An optuna.samplers.BaseSampler; a UserError for an unknown name."""
    return SAMPLERS.create(kind, seed, n_trials)


def make_pruner(kind: str, max_epochs: int) -> Any:
    """An optuna.pruners.BasePruner reading per-epoch validation accuracy; a UserError for an unknown name."""
    return PRUNERS.create(kind, max_epochs)

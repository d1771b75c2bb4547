"""The errors a network builder raises for the user, in a module that imports nothing heavy.

ParamError: a setting it cannot build (ranges are checked before, by the space). WeightsError: pretrained
weights that could not be had. str(e) of either is one line for the user.
"""

from __future__ import annotations


class ParamError(ValueError):
    """A hyperparameter value the network cannot be built with; str(e) is one line for the user."""


class WeightsError(Exception):
    """Pretrained weights could not be had; str(e) says which and how to fix it."""

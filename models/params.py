"""The one error a network builder raises for a setting it cannot build (ranges are checked before, by the space)."""

from __future__ import annotations


class ParamError(ValueError):
    """A hyperparameter value the network cannot be built with; str(e) is one line for the user."""

"""User mistakes, as opposed to bugs: the CLI prints str(error) on one line and exits 2."""

from __future__ import annotations

from data.errors import DataError
from models.errors import ParamError, WeightsError


class UserError(Exception):
    """A bad command line, space file, storage URL or state that the user can fix."""


class FamilyError(UserError):
    """A model family that cannot build or run its model (a builder that raises, an output of the wrong shape)."""


USER_ERRORS = (UserError, DataError, ParamError, WeightsError)

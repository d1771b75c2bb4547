"""User mistakes, as opposed to bugs: the CLI prints str(error) on one line and exits 2."""

from __future__ import annotations

from data import DataError
from models import ParamError, WeightsError


class UserError(Exception):
    """A bad command line, space file, storage URL or state that the user can fix."""


USER_ERRORS = (UserError, DataError, ParamError, WeightsError)

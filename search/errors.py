"""User mistakes, as opposed to bugs: the CLI prints str(error) on one line and exits 2."""

from __future__ import annotations

from data.errors import DataError
from models.errors import ParamError, WeightsError


class UserError(Exception):
    """A bad command line, space file, storage URL or state that the user can fix."""


class FamilyError(UserError):
    """A model family that cannot build or run its model (a builder that raises, an output of the wrong shape)."""


class StorageUnavailable(UserError):
    """The storage cannot be used as it stands: damaged, read-only, or on a full disk.

    Not the fault of the trial being run, so a worker that meets it stops and leaves its trial to be run again
    instead of failing it as a bad setting.
    """


class StorageReadOnly(StorageUnavailable):
    """A storage this process may read but not write: reading commands open it read-only instead."""


USER_ERRORS = (UserError, DataError, ParamError, WeightsError)


def os_reason(error: BaseException) -> str:
    """The OS's words for the first OSError in `error`'s chain ("No space left on device"), else str(error).

    torch.save reports a failed write as RuntimeError("enforce fail ... unexpected pos"), with the OSError of
    the file object it wrote to as its context.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(error)

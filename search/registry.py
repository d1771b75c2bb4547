"""A name -> constructor map with help text: the one list of choices for a kind of thing (sampler, pruner, ...).

The command line takes its `choices` and help from it, and a stored name is turned back into an object through
it, so a choice is registered once and cannot be valid in one place and unknown in another. Importing a
registry is cheap: constructors import their heavy packages when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from search.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    help: str
    create: Callable[..., T]


class Registry(Generic[T]):
    """Choices of one `kind`, in registration order; the first registered is the default."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, help: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(create: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, help, create)
            return create

        return add

    def entries(self) -> tuple[Entry[T], ...]:
        return tuple(self._entries.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    @property
    def default(self) -> str:
        return next(iter(self._entries))

    def describe(self) -> str:
        """"a (default): what a does; b: what b does" for --help."""
        return "; ".join(f"{e.name}{' (default)' if e.name == self.default else ''}: {e.help}"
                         for e in self.entries())

    def check(self, name: str) -> str:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}")
        return name

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self._entries[self.check(name)].create(*args, **kwargs)

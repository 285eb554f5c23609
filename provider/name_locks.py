"""Per-name serialization of the array's management operations.

A LUN's create, delete, resize or reopen commits the catalog and then awaits its storage (creating a thick file,
closing a backend, releasing snapshots). Two operations on one name interleaving at those awaits left the catalog
and the live array disagreeing: a create answered 404 because a delete removed its row while its file was being
opened, and the LUN it then opened stayed live, its descriptor on a deleted file. :class:`NameLocks` gives each name
an ``asyncio.Lock`` that lives only while someone holds or waits for it, so operations on one name run one after the
other while different names never wait for each other. Several names are taken in sorted order, so two bulk
operations cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class NameLocks:
    """One lock per name, created on demand and dropped when its last user leaves (the map stays as small as the
    operations in flight)."""

    _entries: dict[str, _Entry] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def hold(self, *names: str) -> AsyncIterator[None]:
        """Hold every one of ``names`` (duplicates allowed) for the body of the ``async with``."""
        wanted = sorted(set(names))
        entries = []
        for name in wanted:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._entries[name] = _Entry()
            entry.users += 1
            entries.append((name, entry))
        acquired: list[_Entry] = []
        try:
            for _, entry in entries:
                await entry.lock.acquire()
                acquired.append(entry)
            yield
        finally:
            for entry in acquired:
                entry.lock.release()
            for name, entry in entries:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[name]

    def busy(self) -> int:
        """How many names are held or waited for (for tests and the status view)."""
        return len(self._entries)


class _Locked(Protocol):
    name_locks: NameLocks


S = TypeVar("S", bound=_Locked)
P = ParamSpec("P")
R = TypeVar("R")


def by_name(
    names: Callable[..., Iterable[str]],
) -> Callable[[Callable[Concatenate[S, P], Coroutine[Any, Any, R]]], Callable[Concatenate[S, P], Coroutine[Any, Any, R]]]:
    """Run a method of an object with ``name_locks`` holding the names ``names(self, *args, **kwargs)`` gives."""

    def wrap(
        method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def locked(obj: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            async with obj.name_locks.hold(*names(obj, *args, **kwargs)):
                return await method(obj, *args, **kwargs)

        return locked

    return wrap

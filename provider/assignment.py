"""Which worker process owns which target: the placement rule of ``lunsync serve --workers N``.

A target and every LUN mapped on it have one owner, so all per-LUN state (reservations, unit attentions, write gates,
copy-on-write maps, resync jobs) lives in one process and the data path takes no locks. At start the targets are dealt
round-robin in catalog order, which spreads N targets over N workers exactly (a hash of the name would put two of two
targets on one worker half the time). During a run a target never moves: moving it would mean moving its LUNs' live
state under its sessions. A target created later goes to the worker owning the fewest, the lowest-numbered on a tie;
a deleted one frees its place. Across a restart the deal is made again from the catalog; the sessions reconnect
after a restart anyway. Pure: no processes here, only the table.
"""

from __future__ import annotations

from collections.abc import Iterable


class Assignment:
    """Target name (case-insensitive, as the directory keys them) -> worker index in ``range(workers)``."""

    def __init__(self, workers: int, targets: Iterable[str] = ()) -> None:
        if workers < 1:
            raise ValueError(f"at least one worker is needed, not {workers}")
        self.workers = workers
        self._owner: dict[str, int] = {}
        for i, name in enumerate(targets):
            self._owner.setdefault(name.lower(), i % workers)

    def owner(self, target: str) -> int | None:
        return self._owner.get(target.lower())

    def place(self, target: str) -> int:
        """The worker of ``target``: the one it has, or, for a new target, the least loaded."""
        key = target.lower()
        have = self._owner.get(key)
        if have is not None:
            return have
        load = [0] * self.workers
        for w in self._owner.values():
            load[w] += 1
        w = min(range(self.workers), key=lambda i: (load[i], i))
        self._owner[key] = w
        return w

    def remove(self, target: str) -> int | None:
        """Forget ``target``; the worker that owned it, if any."""
        return self._owner.pop(target.lower(), None)

    def owned_by(self, worker: int) -> list[str]:
        """The targets of ``worker``, in the order they were placed."""
        return [t for t, w in self._owner.items() if w == worker]

"""Which worker process owns which target: the placement rule of ``lunsync serve --workers N``.

A target and every LUN mapped on it have one owner, so all per-LUN state (reservations, unit attentions, write gates,
copy-on-write maps, resync jobs) lives in one process and the data path takes no locks. At start the targets are dealt
round-robin in catalog order, which spreads N targets over N workers exactly (a hash of the name would put two of two
targets on one worker half the time); a target that shows a LUN an earlier target shows goes where that one went,
since a LUN is served by one process only. A target created later goes to the worker owning the fewest, the
lowest-numbered on a tie; a deleted one frees its place. During a run a target with LUNs never moves: moving it would
mean moving its LUNs' live state under its sessions. An empty one (no LUN, no session) may, to the worker of the
first LUN it maps. Across a restart the deal is made again from the catalog; the sessions reconnect after a restart
anyway. Pure: no processes here, only the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class Assignment:
    """Target name (case-insensitive, as the directory keys them) -> worker index in ``range(workers)``."""

    def __init__(self, workers: int, targets: Iterable[str] = (), near: Mapping[str, str] | None = None) -> None:
        """``near`` maps a target to an earlier one it must share a worker with (they show the same LUN)."""
        if workers < 1:
            raise ValueError(f"at least one worker is needed, not {workers}")
        self.workers = workers
        self._owner: dict[str, int] = {}
        dealt = 0
        for name in targets:
            if name.lower() in self._owner:
                continue
            w = self.owner(near[name]) if near and name in near else None
            if w is None:
                w, dealt = dealt % workers, dealt + 1
            self._owner[name.lower()] = w

    def owner(self, target: str) -> int | None:
        return self._owner.get(target.lower())

    def place(self, target: str, near: str | None = None) -> int:
        """The worker of ``target``: the one it has, or, for a new target, that of ``near`` (a target showing a LUN
        it shows too), else the least loaded."""
        key = target.lower()
        have = self._owner.get(key)
        if have is not None:
            return have
        beside = self.owner(near) if near is not None else None
        if beside is not None:
            self._owner[key] = beside
            return beside
        load = [0] * self.workers
        for w in self._owner.values():
            load[w] += 1
        w = min(range(self.workers), key=lambda i: (load[i], i))
        self._owner[key] = w
        return w

    def move(self, target: str, worker: int) -> None:
        """Give ``target`` (placed already) to ``worker``; the caller has checked that nothing of it is live."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"no worker {worker} among {self.workers}")
        key = target.lower()
        if key not in self._owner:
            raise KeyError(target)
        self._owner[key] = worker

    def remove(self, target: str) -> int | None:
        """Forget ``target``; the worker that owned it, if any."""
        return self._owner.pop(target.lower(), None)

    def owned_by(self, worker: int) -> list[str]:
        """The targets of ``worker``, in the order they were placed."""
        return [t for t, w in self._owner.items() if w == worker]

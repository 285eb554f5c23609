"""Which worker process owns which target: the placement rule of ``lunsync serve --workers N``.

A target and every LUN mapped on it have one owner, so all per-LUN state (reservations, unit attentions, write gates,
copy-on-write maps, resync jobs) lives in one process and the data path takes no locks. At start the targets are dealt
round-robin in catalog order, which spreads N targets over N workers exactly (a hash of the name would put two of two
targets on one worker half the time); a target linked by the LUNs it shows to an earlier target goes where that one
went, since a LUN is served by one process only. A target created later goes to the worker owning the fewest, the
lowest-numbered on a tie; a deleted one frees its place. During a run a target with LUNs never moves: moving it would
mean moving its LUNs' live state under its sessions. An empty one (no LUN, no session) may, to the worker of the
first LUN it maps. :meth:`Assignment.split` checks a whole configuration before ``apply`` writes it: with the
targets placed as they would be, each LUN must be shown by targets of one worker only, and a LUN that would change
workers must be free to move. Across a restart the deal is made again from the catalog; the sessions reconnect after a restart
anyway. Pure: no processes here, only the table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence


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

    def split(self, targets: Sequence[tuple[str, Sequence[str]]], luns: Iterable[str],
              home: Callable[[str], int | None], pinned: Callable[[str], str | None],
              made_from: Callable[[str], str | None] = lambda _: None) -> list[tuple[str, str]]:
        """What a configuration would leave unservable, as ``(lun, why)``; empty when every LUN has one worker.

        ``targets`` are the configuration's, in the order the catalog will hold them (the kept ones in their order,
        then the new ones), each with its LUN names by LUN number; ``luns`` names every LUN of it. New targets are
        placed as :meth:`place` will place them then (:func:`beside` the earliest target they share LUNs with, else on
        the least loaded worker); the others keep their worker. A LUN's worker is that of the first target showing it;
        one no target shows goes with the LUN it was made from (``made_from``, followed back), else to worker 0.
        ``home`` is a LUN's worker now (None: a new LUN) and ``pinned`` why a LUN cannot change workers (None: it
        can)."""
        after = Assignment(self.workers)
        after._owner = dict(self._owner)
        first: dict[str, str] = {}
        for iqn, shows in targets:
            for name in shows:
                first.setdefault(name, iqn)
        near = beside(targets)
        shown: dict[str, dict[int, list[str]]] = {}
        for iqn, shows in targets:
            w = after.place(iqn, near.get(iqn))
            for name in shows:
                shown.setdefault(name, {}).setdefault(w, []).append(iqn)
        out: list[tuple[str, str]] = []
        for name, by_worker in shown.items():
            if len(by_worker) > 1:
                where = "; ".join(f"{', '.join(ts)} on worker {w}" for w, ts in sorted(by_worker.items()))
                why = (f"would be shown by targets of different workers ({where}): a LUN is served by one worker "
                       "process, so every target showing it must be of that worker")
                out.append((name, why))
        def unshown(name: str) -> int:
            seen = {name}
            while (origin := made_from(name)) is not None and origin not in seen:
                if origin in first:
                    return after.owner(first[origin]) or 0
                seen.add(name := origin)
            return 0

        for name in luns:
            now, then = home(name), after.owner(first[name]) if name in first else unshown(name)
            stays = pinned(name) if now is not None and now != then else None
            if stays is not None and name not in {n for n, _ in out}:
                why = (f"would move from worker {now} to worker {then}, and it {stays}, which keeps it on its worker "
                       f"process; show it on targets of worker {now} only")
                out.append((name, why))
        return out


def beside(targets: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """Each target (of ``targets``, ``(iqn, LUN names)`` in catalog order) that must share a worker with an earlier
    one -> the earliest target it is linked to by shown LUNs, directly or through other targets. A LUN is served by
    one process, so a target showing LUNs of two earlier targets ties all three to one worker."""
    parent = {iqn: iqn for iqn, _ in targets}
    order = {iqn: i for i, (iqn, _) in enumerate(targets)}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = t = parent[parent[t]]
        return t

    shown_by: dict[str, str] = {}
    for iqn, shows in targets:
        for name in shows:
            a, b = root(shown_by.setdefault(name, iqn)), root(iqn)
            if a != b:
                a, b = (a, b) if order[a] < order[b] else (b, a)
                parent[b] = a
    return {iqn: root(iqn) for iqn, _ in targets if root(iqn) != iqn}

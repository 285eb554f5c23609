"""Snapshot sets whose LUNs live on several worker processes: the worker's part of the two-phase hold, and the
control's coordinator that records the set once.

With ``serve --workers`` each worker's :class:`~lunsync.provider.snapshot_service.SnapshotService` holds, snapshots
and releases its own LUNs, and the catalog is shared. A set over LUNs of several workers is still one point in time
(:mod:`lunsync.provider.two_phase` says why): the control plans the whole set against the catalog (every refusal
before anything is held), asks every worker to *prepare* its members (hold and drain), and once all are held to
*commit* (set the epochs at the held instant and release). Only then does it record the set, one set id, one creation
time, the members of every worker, in one catalog transaction, and tell each worker how that went (*finish*), which
either completes the snapshots (marks what failed to preserve meanwhile, starts clone fills) or abandons them and
frees their copies. A worker that cannot hold, or the prepare deadline, aborts everywhere with nothing taken. The
methods are worker-internal calls over the control/worker channel (:data:`METHODS`), not part of the public API.

A worker keeps each operation by the id the control gave it: a prepare still draining when its abort arrives is
cancelled (which releases what it holds); a hold that never gets its commit releases itself after the service's
``hold_timeout_s``; and when the control goes away (:meth:`HoldParticipant.lost`) nothing more can come, so holds are
released and a committed set is completed or abandoned by whether the catalog has its record.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence

from lunsync.provider import two_phase
from lunsync.provider.rpc import Json
from lunsync.provider.snapshot_service import HeldSet, HoldTimeout, SnapshotService, TakenSet
from lunsync.snapshots.catalog import Invalid, NotFound
from lunsync.snapshots.snapcat import Kind, SnapshotCatalog, SnapshotRecord

log = logging.getLogger("lunsync.snapshots")

PREPARE, COMMIT, ABORT = two_phase.Verb.PREPARE.value, two_phase.Verb.COMMIT.value, two_phase.Verb.ABORT.value
FINISH = "hold.finish"
METHODS = frozenset({PREPARE, COMMIT, ABORT, FINISH})
ABORTED_KEPT = 1024

WorkerCall = Callable[[int, str, dict[str, Json]], Awaitable[Json]]


def _specs(value: Json) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, str)
                                                                                         for x in s) for s in value):
        raise Invalid("a hold's members are [lun, snapshot] pairs")
    return [(s[0], s[1]) for s in value]


def _op(params: dict[str, Json]) -> str:
    op = params.get("op")
    if not isinstance(op, str) or not op:
        raise Invalid("a hold call needs its operation id")
    return op


class HoldParticipant:
    """The worker's side: the hold calls of :data:`METHODS`, on this process's snapshot service."""

    def __init__(self, service: Callable[[], SnapshotService | None]) -> None:
        self._service = service
        self._preparing: dict[str, asyncio.Task[HeldSet]] = {}
        self._held: dict[str, HeldSet] = {}
        self._taken: dict[str, TakenSet] = {}
        # Operations aborted here, so that a late prepare of one is refused; the newest only (ids are never reused).
        self._aborted: dict[str, None] = {}

    def service(self) -> SnapshotService:
        svc = self._service()
        if svc is None:
            raise NotFound("this worker takes no snapshots (its LUNs are not loaded yet)")
        return svc

    async def call(self, method: str, params: dict[str, Json]) -> Json:
        """Run one hold call; its result, or the exception the control is answered with."""
        op = _op(params)
        if method == PREPARE:
            return await self._prepare(op, params)
        if method == COMMIT:
            return await self._commit(op)
        if method == ABORT:
            await self._abort(op)
            return {}
        if method == FINISH:
            return await self._finish(op, params.get("recorded") is True)
        raise Invalid(f"no hold call {method!r}")

    async def _prepare(self, op: str, params: dict[str, Json]) -> Json:
        if op in self._aborted or op in self._preparing or op in self._held or op in self._taken:
            raise Invalid(f"hold {op} was already prepared or abandoned")
        kind, pool, set_name = params.get("kind", "differential"), params.get("pool"), params.get("set_name")
        if kind not in ("differential", "clone") or not (pool is None or isinstance(pool, str)) or not (
                set_name is None or isinstance(set_name, str)):
            raise Invalid("a hold's kind, pool or set name is not valid")
        task = asyncio.get_running_loop().create_task(
            self.service().prepare(_specs(params.get("specs")), kind, pool, set_name))
        self._preparing[op] = task
        try:
            await asyncio.wait([task])
        finally:
            self._preparing.pop(op, None)
        if task.cancelled():
            raise HoldTimeout(f"hold {op} was abandoned while its writes drained; nothing was taken")
        held = task.result()
        if op in self._aborted:  # the abort came as the drain completed
            await self.service().abandon(held)
            raise HoldTimeout(f"hold {op} was abandoned; nothing was taken")
        self._held[op] = held
        return {"drain_ms": (held.drained - held.started) * 1000}

    async def _commit(self, op: str) -> Json:
        held = self._held.pop(op, None)
        if held is None:
            raise HoldTimeout(f"hold {op} is not held here (abandoned, or past its deadline); nothing was taken")
        taken = await self.service().commit(held)
        self._taken[op] = taken
        return {"epochs": {p.lun_name: e for p, e in zip(held.plans, held.epochs, strict=True)},
                "kinds": {p.lun_name: k for p, k in zip(held.plans, held.kinds, strict=True)},
                "hold_ms": taken.hold_ms}

    async def _abort(self, op: str) -> None:
        self._aborted[op] = None
        if len(self._aborted) > ABORTED_KEPT:
            del self._aborted[next(iter(self._aborted))]
        task = self._preparing.get(op)
        if task is not None:
            task.cancel()  # the prepare's own cleanup releases what it holds
            await asyncio.wait([task])
        held = self._held.pop(op, None)
        if held is not None:
            await self.service().abandon(held)
        taken = self._taken.pop(op, None)
        if taken is not None:  # committed, but the set was not recorded: take it back
            await self.service().finish(taken, recorded=False)

    async def _finish(self, op: str, recorded: bool) -> Json:
        taken = self._taken.pop(op, None)
        if taken is None:
            raise NotFound(f"hold {op} has no committed snapshots here")
        recs = await self.service().finish(taken, recorded=recorded)
        return [r.full_name for r in recs]

    async def lost(self) -> None:
        """The control went away: release every hold, and complete or abandon each committed set by whether the
        catalog has its record (no control is left to record it later)."""
        for op in list(self._preparing) + list(self._held):
            await self._abort(op)
        for op, taken in list(self._taken.items()):
            svc = self.service()
            plans = taken.held.plans
            want = {(p.lun_name, p.name): e for p, e in zip(plans, taken.held.epochs, strict=True)}
            try:
                have = {(r.lun_name, r.name): r.epoch for r in svc.cat.get_snapshots(list(want))}
            except NotFound:
                have = {}
            self._taken.pop(op, None)
            await svc.finish(taken, recorded=have == want)


def by_worker(specs: Sequence[tuple[str, str]], owner: Callable[[str], int | None]) -> dict[int, list[tuple[str, str]]]:
    """The members of a set grouped by the worker serving each LUN (NotFound for a LUN no worker serves)."""
    out: dict[int, list[tuple[str, str]]] = {}
    for lun, snap in specs:
        w = owner(lun)
        if w is None:
            raise NotFound(f"lun {lun!r} is served by no worker")
        out.setdefault(w, []).append((lun, snap))
    return out


async def create_set(cat: SnapshotCatalog, specs: Sequence[tuple[str, str]], owner: Callable[[str], int | None],
                     call: WorkerCall, *, kind: Kind = "differential", pool: str | None = None,
                     set_name: str | None = None, labels: dict[str, str] | None = None,
                     timeout_s: float = 10.0, generation: Callable[[int], object] = lambda _: 0
                     ) -> tuple[list[SnapshotRecord], float]:
    """Take one snapshot set across the workers serving ``specs``' LUNs, ``call(worker, method, params)`` being the
    control's call to a worker; returns the records and the longest hold of any worker in ms. Raises what the
    catalog refuses before anything is held, and HoldTimeout (409) naming the workers when the hold did not take
    (nothing was taken anywhere).

    ``generation(worker)`` changes when a new process is started in a worker's place (its restart count). A worker
    restarted after its commit may have reopened its pool before the record, and then freed the copies made for its
    snapshots (they belonged to no recorded snapshot) and stopped preserving for them: before the record that aborts
    the set, and after it those workers' snapshots are marked invalid rather than left silently wrong. A new process
    started after the check reads the catalog with the record in it, and keeps the copies."""
    plans = await asyncio.to_thread(cat.plan_snapshots, list(specs), kind, pool, set_name)
    members = by_worker(specs, owner)
    started = {w: generation(w) for w in members}

    def restarted() -> list[int]:
        return [w for w in sorted(members) if generation(w) != started[w]]

    op = uuid.uuid4().hex
    base: dict[str, Json] = {"op": op}

    async def send(s: two_phase.Send) -> Json:
        params = dict(base)
        if s.verb is two_phase.Verb.PREPARE:
            params.update(specs=[list(m) for m in members[s.worker]], kind=kind, pool=pool, set_name=set_name)
        return await call(s.worker, s.verb.value, params)

    async def tell_all(method: str, **extra: Json) -> list[object]:
        return await asyncio.gather(*(call(w, method, {**base, **extra}) for w in sorted(members)),
                                    return_exceptions=True)

    what = set_name or ", ".join(f"{a}@{b}" for a, b in specs)
    try:
        answers = await two_phase.run({w: [f"{a}@{b}" for a, b in m] for w, m in members.items()}, send,
                                      timeout_s=timeout_s)
    except two_phase.HoldFailed as e:
        await tell_all(ABORT)  # a worker that committed takes its part back; the others have nothing to release
        log.warning("snapshot set %s across workers %s not taken: %s", what, sorted(members), e)
        raise HoldTimeout(f"snapshot set {what} across workers {', '.join(map(str, sorted(members)))} was not "
                          f"taken ({e}); nothing was recorded") from None
    epochs: dict[str, int] = {}
    kinds: dict[str, Kind] = {}
    hold_ms = 0.0
    for a in answers.values():
        assert isinstance(a, dict)
        epochs.update(a["epochs"])
        kinds.update(a["kinds"])
        hold_ms = max(hold_ms, float(a["hold_ms"]))
    try:
        if restarted():
            raise HoldTimeout(f"snapshot set {what}: worker(s) {', '.join(map(str, restarted()))} restarted after "
                              "the commit; nothing was recorded")
        await asyncio.to_thread(cat.record_snapshots, plans, [kinds[p.lun_name] for p in plans], set_name,
                                [epochs[p.lun_name] for p in plans], hold_ms if set_name is not None else None,
                                labels)
    except BaseException:
        await tell_all(FINISH, recorded=False)
        raise
    lost = restarted()
    if lost:
        reason = (f"worker {', '.join(map(str, lost))} restarted while the set was being recorded: the copies made "
                  "for it there may be gone")
        for p in plans:
            if owner(p.lun_name) in lost:
                await asyncio.to_thread(cat.mark_invalid, p.lun_id, [epochs[p.lun_name]], reason)
        log.error("snapshot set %s: %s; those members are marked invalid", what, reason)
    for w, r in zip(sorted(members), await tell_all(FINISH, recorded=True), strict=True):
        if isinstance(r, BaseException):  # recorded: the worker completes it when it learns (lost) or restarts
            log.error("snapshot set %s: worker %d did not take the news that it is recorded: %s", what, w, r)
    recs = await asyncio.to_thread(cat.get_snapshots, [(p.lun_name, p.name) for p in plans])
    log.info("snapshot set %s taken across workers %s (writes held at most %.2f ms)", what, sorted(members), hold_ms)
    return recs, hold_ms

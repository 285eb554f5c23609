"""Recovery sets whose destinations are LUNs of several worker processes: each worker's part, and the control's
coordinator that starts the parts together and shows them as one set.

A restore runs in the worker that serves its destination (its region map and copier are per-LU state, which has one
owner). So a recovery set over destinations of several workers is one *part* per worker, each an ordinary recovery
set of that worker's :class:`~lunsync.provider.vss.RecoveryManager`, kept in the catalog under the id
``<set>-<worker>`` (:func:`part_id`), which is how a worker restarted by kill -9, or the whole daemon, finds and
resumes its own part and how the control finds the parts again. The control starts them with the two-phase pattern
of :mod:`lunsync.provider.two_phase`: *prepare* makes every worker create, fill and pre-restore its part (every
check, hook and refusal before any destination is touched), *commit* (RecoverSet) only once all are prepared, so
either every destination serves its snapshot when the answer comes or every part is failed with the reason and none
is restored; a worker whose commit fails has the others' parts failed, as one process stops the pairs it had
started when one cannot start. The restart rules stay those of one set, part by part: a part still pending or in
pre-restore when its worker restarts is failed by that worker, a resyncing one resumes from its bitmap; and since a
set must start everywhere or nowhere, a part that started while another never did (a worker, or the whole daemon,
killed between the parts' starts) is failed too, once its worker answers (:func:`unstarted`, :meth:`settle`). The set's state is the parts' states merged (:func:`merged_state`), so it is done only when every part is,
and reads as one process's set would. The worker-internal calls are :data:`METHODS`, not part of the public API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lunsync.provider import two_phase
from lunsync.provider.channel import ChannelClosed, RemoteError
from lunsync.provider.forward import HttpRequest, HttpResponse
from lunsync.provider.rpc import Json
from lunsync.provider.vss import TERMINAL, Options, RecoveryState, VssCode, VssError

if TYPE_CHECKING:
    from lunsync.provider.vss import RecoveryManager

log = logging.getLogger("lunsync.vss")

PREPARE, COMMIT, ABORT = "recovery.prepare", "recovery.commit", "recovery.abort"
METHODS = frozenset({PREPARE, COMMIT, ABORT})
_PART = re.compile(r"^([0-9a-f]{12})-([0-9]+)$")
# A prepare runs the part's pre-restore hooks; its deadline leaves them their own timeouts.
PREPARE_S = 30.0


def part_id(set_id: str, worker: int) -> str:
    return f"{set_id}-{worker}"


def set_of(part: str) -> str | None:
    """The set across workers that recovery set ``part`` is a part of (None: a set of its own)."""
    m = _PART.match(part)
    return m.group(1) if m else None


# --- the worker's side -----------------------------------------------------------------------------------------


async def serve(manager: RecoveryManager | None, method: str, params: dict[str, Json]) -> Json:
    """One phase of this worker's part ``params["part"]``; VssError (with its status) when it is refused."""
    if manager is None:
        raise VssError(VssCode.BAD_STATE, "recovery is not available on this worker yet")
    part = params.get("part")
    if not isinstance(part, str) or set_of(part) is None:
        raise VssError(VssCode.INVALID_ARG, f"{method}: bad part id {part!r}")
    if method == PREPARE:
        pairs = params.get("pairs")
        options = params.get("options")
        if not isinstance(pairs, list) or not isinstance(options, dict) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and (p[1] is None or isinstance(
                    p[1], str)) for p in pairs):
            raise VssError(VssCode.INVALID_ARG, f"{method}: pairs are [snapshot, destination] and options a dict")
        rs = await manager.prepare([(str(p[0]), None if p[1] is None else str(p[1])) for p in pairs if
                                    isinstance(p, list)], Options.from_dict(dict(options)), set_id=part)
        return {"state": rs.state.value}
    if method == COMMIT:
        rs = await manager.recover(part)
        return {"state": rs.state.value}
    if method == ABORT:
        have = manager.sets.get(part)
        if have is not None and have.state not in TERMINAL:
            await manager.cancel(part, failed=str(params.get("reason") or "the set across workers did not start"))
        return {}
    raise VssError(VssCode.INVALID_ARG, f"no recovery call {method!r}")


# --- the merged view -------------------------------------------------------------------------------------------


def merged_state(states: Iterable[str]) -> str:
    """The state of a set whose parts are in ``states``: unfinished while any part is (the furthest along of the
    unfinished ones, as one process's set is resyncing until its last copier ends), then failed if any part failed,
    cancelled if any was cancelled, done only when all are."""
    got = list(states)
    for s in (RecoveryState.RESYNCING, RecoveryState.PRE_RESTORE, RecoveryState.PENDING):
        if str(s) in got:
            return str(s)
    for s in (RecoveryState.FAILED, RecoveryState.CANCELLED):
        if str(s) in got:
            return str(s)
    return str(RecoveryState.DONE) if got else str(RecoveryState.FAILED)


def merged_status(set_id: str, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One set's status (the API's RecoverySetOut) from its parts' statuses, pairs worker by worker."""
    pairs = [p for part in parts for p in part.get("pairs", [])]
    total = sum(int(p.get("bytes_total", 0)) for p in pairs)
    done = sum(int(p.get("bytes_done", 0)) for p in pairs)
    state = merged_state(str(part.get("state")) for part in parts)
    etas = [part.get("eta_s") for part in parts if part.get("state") not in {s.value for s in TERMINAL}]
    errors = [f"{part.get('id')}: {part['error']}" for part in parts if part.get("error")]
    finished = [part.get("finished_at") for part in parts]
    started = [part.get("started_at") for part in parts if part.get("started_at")]
    return {
        "id": set_id, "state": state,
        "percent": 100.0 if state == RecoveryState.DONE.value or total == 0 else round(100.0 * done / total, 2),
        "bytes_total": total, "bytes_done": done,
        "bytes_copied": sum(int(p.get("bytes_copied", 0)) for p in pairs),
        "rate_bps": round(sum(float(part.get("rate_bps", 0.0)) for part in parts), 1),
        "eta_s": 0.0 if state == RecoveryState.DONE.value else None if not etas or None in etas else max(
            float(e) for e in etas if e is not None),
        "redirected_reads": sum(int(p.get("redirected_reads", 0)) for p in pairs),
        "pairs": pairs, "options": parts[0].get("options", {}) if parts else {},
        "error": "; ".join(errors) or None,
        "hooks": [h for part in parts for h in part.get("hooks", [])],
        "created_at": min(str(part.get("created_at")) for part in parts) if parts else None,
        "started_at": max(str(t) for t in started) if started and len(started) == len(parts) else None,
        "finished_at": max(str(f) for f in finished) if finished and None not in finished else None,
        "parts": [str(part.get("id")) for part in parts],
    }


def merged_list(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every worker's recovery sets with the parts of a set across workers shown as that one set, oldest first."""
    out: list[dict[str, Any]] = []
    parts: dict[str, list[Mapping[str, Any]]] = {}
    for item in items:
        whole = set_of(str(item.get("id")))
        if whole is None:
            out.append(dict(item))
        else:
            parts.setdefault(whole, []).append(item)
    out += [merged_status(sid, sorted(ps, key=lambda p: str(p.get("id")))) for sid, ps in parts.items()]
    return sorted(out, key=lambda s: str(s.get("created_at")))


# --- the control's coordinator ---------------------------------------------------------------------------------

WorkerCall = Callable[[int, str, dict[str, Json]], Awaitable[Json]]
Forward = Callable[[int, HttpRequest], Awaitable[HttpResponse]]
Recorded = tuple[str, str, float | None, Sequence[str]]  # a recovery set's id, state, start and destinations
_TERMINAL = frozenset(str(s) for s in TERMINAL)


def unstarted(parts: Iterable[tuple[str, str, float | None]]) -> list[str]:
    """The parts (id, state, started_at) to fail: when one part ended before its copy started, the set never
    started everywhere (its requester was told so, or told nothing, as when a restart catches a one-process set
    before its start), so every part still unfinished is failed; none otherwise. A part that fails while copying
    leaves the others to finish, as one process's copiers do."""
    got = list(parts)
    if not any(state in _TERMINAL and started is None for _, state, started in got):
        return []
    return [pid for pid, state, _ in got if state not in _TERMINAL]


def why(failures: Sequence[str]) -> str:
    return f"the set across workers did not start ({'; '.join(failures) or 'its hold was abandoned'})"


def _error(status: int, message: str) -> HttpResponse:
    code = {404: "not_found", 409: "conflict", 422: "invalid", 503: "unavailable"}.get(status, "invalid")
    return HttpResponse.of_json(status, {"error": message, "code": code})


class CrossRecovery:
    """The control's side: where each set across workers has its parts (``parts``: set id -> part ids), how to
    start one, and how a request about it is answered from its parts."""

    def __init__(self, call: WorkerCall, forward: Forward, lun_owner: Callable[[str], int | None],
                 runs_on: Callable[[dict[str, Json]], str | None], recorded: Callable[[], Iterable[Recorded]]
                 ) -> None:
        self._recorded = recorded
        self._later: set[asyncio.Task[None]] = set()
        self._call = call
        self._forward = forward
        self._lun_owner = lun_owner
        self._runs_on = runs_on
        self.parts: dict[str, dict[str, str]] = {}  # set id -> part id -> a destination of that part

    def load(self) -> None:
        """The sets across workers that the catalog holds."""
        for rid, _, _, dests in self._recorded():
            whole = set_of(rid)
            if whole is not None and dests:
                self.parts.setdefault(whole, {})[rid] = dests[0]

    async def settle(self, set_ids: Iterable[str]) -> bool:
        """Fail the parts of a set that never started everywhere (:func:`unstarted`), from what the catalog says
        now; True once nothing is left to fail (False: a part's worker is down, ask again)."""
        want = set(set_ids)
        by_set: dict[str, list[tuple[str, str, float | None]]] = {}
        for rid, state, started, _ in self._recorded():
            whole = set_of(rid)
            if whole in want:
                by_set.setdefault(whole, []).append((rid, state, started))
        settled = True
        for whole, parts in by_set.items():
            for part in unstarted(parts):
                try:
                    worker = self._part_worker(part, self.parts.get(whole, {}).get(part, ""))
                    await self._call(worker, ABORT, {"part": part, "reason": why(
                        [f"{p} {st}" for p, st, t in parts if st in _TERMINAL and t is None])})
                    log.warning("recovery %s: part %s failed, as the set did not start everywhere", whole, part)
                except (ChannelClosed, RemoteError):
                    settled = False
        return settled

    async def settle_later(self, set_id: str, timeout_s: float = 120.0) -> None:
        """:meth:`settle` until it holds: a part whose worker died after its start (and resumes it on restart)
        is failed once that worker is back."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await self.settle([set_id]) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)

    def spans(self, set_id: str) -> bool:
        return set_id in self.parts

    def _worker_of(self, dest: str) -> int:
        return self._lun_owner(dest) or 0

    def _part_worker(self, part: str, dest: str) -> int:
        """Where the part runs: its destination's worker; before a new destination exists, the worker it was
        started on (the snapshot's, which makes and keeps it)."""
        owner = self._lun_owner(dest)
        return owner if owner is not None else int(part.rsplit("-", 1)[1])

    async def create(self, body: dict[str, Json], options: Options) -> HttpResponse:
        """``POST /v1/recovery/resync`` whose pairs run on several workers (``body`` validated by the API's model,
        ``options`` its options): a dry run is each worker's, summed; otherwise the parts start together."""
        raw = body.get("pairs")
        pairs = [p for p in raw if isinstance(p, dict)] if isinstance(raw, list) else []
        by_worker: dict[int, list[int]] = {}
        for i, p in enumerate(pairs):
            runs = self._runs_on(p)
            by_worker.setdefault(self._worker_of(runs) if runs else 0, []).append(i)
        if body.get("dry_run"):
            return await self._dry_run(body, pairs, by_worker)
        set_id = uuid.uuid4().hex[:12]
        plan: dict[int, list[tuple[str, str | None]]] = {
            w: [(str(pairs[i].get("snapshot")), d if isinstance(d := pairs[i].get("destination"), str) else None)
                for i in idx] for w, idx in by_worker.items()}
        statuses: dict[int, int] = {}

        failures: list[str] = []

        async def send(s: two_phase.Send) -> Json:
            params: dict[str, Json] = {"part": part_id(set_id, s.worker)}
            if s.verb is two_phase.Verb.ABORT:
                params["reason"] = why(failures)
            if s.verb is two_phase.Verb.PREPARE:
                params.update(pairs=[[a, b] for a, b in plan[s.worker]], options=options.as_dict())
            method = {two_phase.Verb.PREPARE: PREPARE, two_phase.Verb.COMMIT: COMMIT,
                      two_phase.Verb.ABORT: ABORT}[s.verb]
            try:
                return await self._call(s.worker, method, params)
            except RemoteError as e:
                statuses.setdefault(s.worker, e.status)
                failures.append(f"worker {s.worker}: {e}")
                raise
            except ChannelClosed as e:
                statuses.setdefault(s.worker, 503)
                failures.append(f"worker {s.worker}: {e}")
                raise

        # Each part by a destination of it (a pair without one restores the snapshot's own LUN).
        self.parts[set_id] = {part_id(set_id, w): plan[w][0][1] or plan[w][0][0].partition("@")[0]
                              for w in sorted(plan)}
        try:
            await two_phase.run({w: [part_id(set_id, w)] for w in plan}, send, timeout_s=PREPARE_S)
        except two_phase.HoldFailed as e:
            # Parts committed before another failed are cancelled: no destination keeps serving a snapshot of a
            # set that did not start (the prepared ones were told to abort already).
            reason: Json = why([str(e)])
            aborts = await asyncio.gather(*(self._call(w, ABORT, {"part": part_id(set_id, w), "reason": reason})
                                            for w in sorted(plan)), return_exceptions=True)
            if any(isinstance(a, BaseException) for a in aborts):
                # A worker that is down may have started its part before it died, and resumes it when it is back.
                task = asyncio.get_running_loop().create_task(self.settle_later(set_id))
                self._later.add(task)
                task.add_done_callback(self._later.discard)
            status = next((statuses[w] for w in sorted(e.failures) if statuses.get(w, 500) < 500), None)
            return _error(status or 409, f"recovery set {set_id} across workers "
                                         f"{', '.join(map(str, sorted(plan)))} did not start ({e}); no destination "
                                         "is restored")
        resp = await self.show(set_id)
        if not resp.ok:
            return resp
        return HttpResponse.of_json(202, resp.json(), (("location", f"/v1/recovery/{set_id}"),))

    async def _dry_run(self, body: dict[str, Json], pairs: list[dict[str, Json]],
                       by_worker: Mapping[int, list[int]]) -> HttpResponse:
        out: list[Json] = [None] * len(pairs)
        for w, idx in sorted(by_worker.items()):
            one = json.dumps({**body, "pairs": [pairs[i] for i in idx]}).encode()
            resp = await self._forward(w, HttpRequest("POST", "/v1/recovery/resync", "",
                                                      (("content-type", "application/json"),), one))
            if not resp.ok:
                return resp
            for i, p in zip(idx, resp.json().get("pairs", []), strict=True):
                out[i] = p
        total = sum(int(p.get("bytes", 0)) for p in out if isinstance(p, dict))
        return HttpResponse.of_json(200, {"dry_run": True, "bytes": total, "pairs": out})

    async def _each(self, set_id: str, method: str, tail: str, query: str = "", base: str = "/v1/recovery"
                    ) -> list[HttpResponse]:
        parts = self.parts.get(set_id, {})
        return list(await asyncio.gather(*(self._forward(self._part_worker(part, dest), HttpRequest(
            method, f"{base}/{part}{tail}", query, (), b"")) for part, dest in sorted(parts.items()))))

    async def show(self, set_id: str, method: str = "GET", tail: str = "", query: str = "",
                   base: str = "/v1/recovery") -> HttpResponse:
        answers = await self._each(set_id, method, tail, query, base)
        bad = next((r for r in answers if not r.ok), None)
        if bad is not None:
            return bad  # a part's worker restarting answers 503 with Retry-After: ask again
        return HttpResponse.of_json(200, merged_status(set_id, [r.json() for r in answers]))

    async def request(self, set_id: str, req: HttpRequest) -> HttpResponse:
        """A request about set ``set_id`` (``/v1/recovery/<id>[/...]``, or VSS's ``/v1/provider/async/<id>[/...]``,
        whose refusals are VSS's): status, wait, post-restore and cancel are each part's, merged; the steps of the
        one-by-one workflow do not apply to a set started in one call."""
        base, _, tail = req.path.rstrip("/").partition(f"/{set_id}")
        if req.method == "GET" and tail == "":
            return await self.show(set_id, base=base)
        if req.method == "POST" and tail in ("/wait", "/post-restore", "/cancel"):
            if tail == "/cancel":
                await self._each(set_id, "POST", tail, base=base)
                return await self.show(set_id, base=base)
            return await self.show(set_id, "POST", tail, req.query, base)
        return _error(409, f"recovery set {set_id} spans workers ({', '.join(sorted(self.parts[set_id]))}): it was "
                           "started in one call and takes no other step (status, wait, post-restore, cancel)")

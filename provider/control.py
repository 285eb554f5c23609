"""The control process of ``lunsync serve --workers N``: the portal, the public API, metrics and the worker pool.

The control owns the catalog (it holds the data dir's lock, applies ``--config`` and ``--demo`` before any worker
starts, and decides which worker serves which target: :mod:`lunsync.provider.assignment`), the iSCSI portals, and
everything a user talks to. An initiator connects to the control's portal, which runs the login (ACL, CHAP,
discovery with every target listed) against a directory of the catalog's targets, then hands the socket and the
negotiated session to the worker owning the target (:class:`~lunsync.provider.channel.SessionRouter`); a login for a
target whose worker is down is answered SERVICE_UNAVAILABLE, and the initiator retries. The public API checks the
token and the body's size, then forwards each request to the worker :mod:`lunsync.provider.routing` names, over
its channel, and answers what the worker answered; lists are gathered from every worker and merged, status and
portals are answered here. After a change the control re-reads what its portal needs (targets, ACLs, CHAP) from the
catalog, and after one that may move LUNs it has every worker re-read which LUNs it serves, the ones giving LUNs up
first. ``/metrics`` is every process's exposition summed at scrape time. :meth:`Control.call` is the one way to ask
a worker something, and the control answers a worker's calls too: it relays the reads of a snapshot that another
worker serves (:mod:`lunsync.provider.remote_snapshot`). A snapshot set over LUNs of several workers is taken by the
two-phase hold of :mod:`lunsync.provider.cross_set` (a VSS snapshot set's too, asked by the worker holding the set),
and a recovery set over destinations of several workers is started in parts, one per worker, by the same two phases
and shown as one set (:mod:`lunsync.provider.cross_recovery`; VSS's ResyncLuns too); a VSS call that acts on
each LUN by itself is given to each worker with its own LUNs; other work that spans workers (:class:`~lunsync.provider.routing.SpansWorkers`) is refused with a 409 that names the
workers. Under ``--gateway`` the control also runs the gateway's index rounds
(:mod:`lunsync.provider.control_gateway`), while each worker shares the rbd LUNs it serves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lunsync.provider import remote_snapshot, routing, systemd
from lunsync.provider.api_guard import auth_throttle
from lunsync.provider.assignment import Assignment, beside
from lunsync.provider.channel import Channel, ChannelClosed, RemoteError, SessionRouter, control_message
from lunsync.provider.cross_recovery import CrossRecovery, merged_list
from lunsync.provider.forward import HttpRequest, HttpResponse, Receive, Scope, Send
from lunsync.provider.metrics import ApiCounters
from lunsync.provider.rpc import Call, Json, Message, Reply
from lunsync.provider.workers import WorkerPool
from lunsync.snapshots.catalog import CatalogError, NotFound
from lunsync.target.directory import ChapCredentials, Directory, TargetEntry
from lunsync.target.portal import Server
from lunsync.target.scsi.target import ScsiTarget
from lunsync.target.throttle import LoginThrottle

if TYPE_CHECKING:
    from lunsync.provider.daemon import Prepared, ServeOptions
    from lunsync.snapshots.catalog import Catalog

log = logging.getLogger("lunsync.control")

RETRY_AFTER_S = 2  # a worker restarts within a few seconds


def _error(status: int, message: str, code: str) -> HttpResponse:
    headers = (("retry-after", str(RETRY_AFTER_S)),) if status == 503 else ()
    return HttpResponse.of_json(status, {"error": message, "code": code}, headers)


@dataclass
class Control:
    """The control's state: placement, the pool, the portal and the API's bookkeeping."""

    opts: ServeOptions
    prep: Prepared
    count: int
    token: str = ""
    read_token: str | None = None
    counters: ApiCounters = field(default_factory=ApiCounters)
    auth_throttle: LoginThrottle = field(default_factory=auth_throttle)
    started: float = field(default_factory=time.monotonic)
    api_address: str = "off"
    metrics_address: str | None = None
    sets: dict[str, int] = field(default_factory=dict)  # recovery and VSS set ids -> the worker that holds them

    def __post_init__(self) -> None:
        self.catalog: Catalog = self.prep.catalog
        self.assignment = Assignment(self.count, [t.iqn for t in self.catalog.list_targets()], self.near())
        self.directory = Directory()
        self.sync_portal()
        self.server = Server(self.directory, self.prep.settings, hand_off=SessionRouter(self._channel_of))
        self.pool = WorkerPool(self.count, self.command, self._on_message, self._on_down)
        self.lock = asyncio.Lock()  # changes run one at a time: a LUN moving between workers is never seen halfway
        self.recovery_sets = CrossRecovery(self.call, self.forward, self.lun_owner, self._runs_on, lambda: [
            (row.id, row.state, row.started_at, [p.destination for p in pairs])
            for row, pairs in self.catalog.recovery_sets()])
        self.recovery_sets.load()
        self.placement = routing.Placement(self.assignment.owner, self.lun_owner, self.sets.get, self.serial_lun,
                                           self.exposed_on, self.recovery_sets.spans)
        self._relays: set[asyncio.Task[None]] = set()  # workers' calls being answered

    # -- workers ------------------------------------------------------------------------------------------------------

    def command(self, index: int, fd: int) -> Sequence[str]:
        o = self.opts
        argv = [sys.executable, "-m", "lunsync.provider.worker", "--fd", str(fd), "--index", str(index),
                "--data-dir", self.prep.data_dir, "--write-staging", str(o.write_staging_bytes),
                "--api-max-body", str(o.api_max_body_bytes), "--log-level", o.log_level, "--log-format",
                o.log_format]
        if o.hooks:
            argv += ["--hooks", os.path.abspath(o.hooks)]
        if o.gateway is not None:
            g = o.gateway
            argv += ["--gateway", g.gateway_id, "--port-group", str(g.port_group), "--gateway-pool", g.pool,
                     "--lease", str(g.lease_s)]
        if index == 0:
            argv.append("--holds-unmapped")
        for iqn in self.assignment.owned_by(index):
            argv += ["--target", iqn]
        return argv

    def _channel_of(self, target: str) -> Channel | None:
        owner = self.assignment.owner(target)
        return self.pool.channel(owner) if owner is not None else None

    def _on_message(self, index: int, msg: Message, sock: object) -> None:
        if isinstance(msg, Call):
            # The channel it came on, even before its worker is ready: a restore it resumes reads as it starts.
            ch = self.pool.workers[index].channel
            if ch is not None:
                task = asyncio.get_running_loop().create_task(self._answer_worker(index, ch, msg))
                self._relays.add(task)
                task.add_done_callback(self._relays.discard)
            return
        control_message(self.server, msg)

    async def _answer_worker(self, index: int, ch: Channel, call: Call) -> None:
        """A worker's call: ``snapshot-read`` (:mod:`lunsync.provider.remote_snapshot`) goes on to the worker that
        serves the snapshot's LUN, and its answer comes back; a worker that is down is a 503, which the reader
        takes as out of reach for now. ``snapshot-set`` and ``snapshot-delete`` are a VSS snapshot set's, over LUNs
        of several workers (:meth:`vss_call`)."""
        if call.method in ("snapshot-set", "snapshot-delete"):
            resp = await self.vss_call(call.method, call.params)
            body = resp.json()
            if resp.ok:
                ch.send(Reply(call.id, body))
            else:
                error = body.get("error") if isinstance(body, dict) else None
                ch.send(Reply(call.id, error=str(error or resp.status), status=resp.status))
            return
        if call.method != remote_snapshot.METHOD:
            ch.send(Reply(call.id, error=f"unknown call {call.method!r}", status=500))
            return
        ref = call.params.get("snapshot")
        lun = ref.partition("@")[0] if isinstance(ref, str) else ""
        owner = self.lun_owner(lun)
        if owner is None:
            ch.send(Reply(call.id, error=f"no lun {lun!r} for snapshot {ref!r}", status=404))
            return
        if owner == index:  # the LUN moved to the reader itself: it must read its own view, which it will reopen
            ch.send(Reply(call.id, error=f"lun {lun!r} is served by worker {index} now", status=503))
            return
        try:
            result = await self.call(owner, call.method, call.params)
        except ChannelClosed as e:
            ch.send(Reply(call.id, error=f"worker {owner}, which serves lun {lun!r}, is down ({e})", status=503))
            return
        except RemoteError as e:
            ch.send(Reply(call.id, error=f"worker {owner}: {e}", status=e.status))
            return
        ch.send(Reply(call.id, result))

    def _on_down(self, index: int) -> None:
        lost = self.server.remote_sessions_lost(lambda st: self.assignment.owner(st.target_name) == index)
        log.warning("worker %d is down: %d session(s) it served are gone; their initiators log in again", index, lost)

    async def call(self, worker: int, method: str, params: dict[str, Json] | None = None) -> Json:
        """Ask worker ``worker``: its answer, or ChannelClosed (down) / RemoteError (it failed the call)."""
        ch = self.pool.channel(worker)
        if ch is None:
            raise ChannelClosed(f"worker {worker} is not up")
        return await ch.call(method, params)

    async def forward(self, worker: int, req: HttpRequest) -> HttpResponse:
        """Run an API request on worker ``worker``'s app."""
        try:
            return HttpResponse.from_result(await self.call(worker, "http", req.to_params()))
        except ChannelClosed:
            return _error(503, f"worker {worker}, which serves this, is restarting; retry in a few seconds",
                          "unavailable")
        except RemoteError as e:
            return _error(e.status, f"worker {worker}: {e}", "internal")

    # -- placement ----------------------------------------------------------------------------------------------------

    def _runs_on(self, pair: dict[str, Json]) -> str | None:
        return routing.runs_on(pair, self.placement)

    def lun_owner(self, name: str) -> int | None:
        try:
            home = self.catalog.home_target(name)
        except NotFound:
            return None
        if home is None:
            return 0  # an unmapped LUN lives on worker 0, unless it was made from a snapshot
        # The home target's worker, as the workers themselves decide (Array.serves_lun).
        return self.assignment.owner(home)

    def serial_lun(self, serial: str) -> str | None:
        for rec in self.catalog.list_luns():
            if rec.serial == serial:
                return rec.name
        from lunsync.snapshots.snapcat import SnapshotCatalog

        for snap in SnapshotCatalog(self.catalog).list_snapshots():
            if snap.serial == serial:
                return snap.lun_name
        return None

    def exposed_on(self, snapshot: str) -> str | None:
        from lunsync.snapshots.snapcat import SnapshotCatalog, parse_snapshot_name

        try:
            return SnapshotCatalog(self.catalog).get_snapshot(*parse_snapshot_name(snapshot)).exposed_target
        except CatalogError:  # no such snapshot, a bad name: the LUN's worker answers that
            return None

    def near(self, only: set[str] | None = None) -> dict[str, str]:
        """Each target (of ``only``, if given) linked by the LUNs it shows to an earlier target -> the earliest such
        target, whose worker must serve it too (:func:`~lunsync.provider.assignment.beside`)."""
        tied = beside([(t.iqn, [m.name for m in self.catalog.list_mappings(t.iqn)])
                       for t in self.catalog.list_targets()])
        return {t: r for t, r in tied.items() if only is None or t in only}

    def sync_portal(self) -> None:
        """The portal's directory from the catalog: every target with its ACL and CHAP (no LUNs: those are the
        workers'); the placement follows targets made or removed behind the API's back (apply)."""
        targets = self.catalog.list_targets()
        new = {t.iqn for t in targets if self.assignment.owner(t.iqn) is None}
        near = self.near(new) if new else {}
        for t in targets:
            self.assignment.place(t.iqn, near.get(t.iqn))
            old = self.directory.lookup(t.iqn)
            chap_rec = self.catalog.get_chap(t.iqn)
            chap = None if chap_rec is None else ChapCredentials(chap_rec.user, chap_rec.secret,
                                                                 chap_rec.mutual_user, chap_rec.mutual_secret)
            self.directory.add(TargetEntry(t.iqn, old.scsi if old is not None else ScsiTarget(t.iqn),
                                           alias=t.alias or "", acl=frozenset(a.lower() for a in t.acl), chap=chap))
        names = {t.iqn.lower() for t in targets}
        for entry in list(self.directory.targets.values()):
            if entry.name.lower() not in names:
                self.directory.remove(entry.name)
                self.assignment.remove(entry.name)
        for iqn in [i for w in range(self.count) for i in self.assignment.owned_by(w)]:
            if iqn.lower() not in names:
                self.assignment.remove(iqn)

    async def refresh_workers(self) -> None:
        """Every worker re-reads which LUNs it serves: all give up theirs first, then all open their new ones."""
        self.sync_portal()
        for phase in (False, True):
            for w in range(self.count):
                try:
                    await self.call(w, "refresh", {"targets": self.assignment.owned_by(w), "open": phase})
                except (ChannelClosed, RemoteError) as e:  # a restarting worker reads the catalog as it starts
                    log.warning("worker %d: refresh failed: %s", w, e)

    # -- the API ------------------------------------------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The public API behind the token check and the body limit: route, forward, merge."""
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(bytes(msg.get("body", b"")))
            if not msg.get("more_body"):
                break
        req = HttpRequest.from_scope(scope, b"".join(chunks))
        decision = routing.route(req.method, req.path, req.json(), self.placement)
        if not routing.changes_placement(req.method, req.path) or isinstance(decision, (routing.FanOut,
                                                                                        routing.SpansWorkers)):
            resp = await self.decide(decision, req)
        else:
            async with self.lock:
                resp = await self.decide(decision, req)
        await resp.send(send)

    async def across_workers(self, d: routing.SpansWorkers, req: HttpRequest) -> HttpResponse:
        """Work over LUNs of several workers (``d.members`` by worker): a snapshot set is taken by the cross-worker
        coordinator (:meth:`snapshot_set`); anything else is a 409 that says why and names the workers."""
        if d.what == routing.SNAPSHOT_SET and req.method == "POST":
            async with self.lock:
                return await self.snapshot_set(req)
        if d.what == routing.RECOVERY_SET:
            return await self.recovery_set(req)
        if d.what == routing.RESYNC_LUNS and req.method == "POST":
            return await self.resync_luns(req)
        if d.what == routing.PER_LUN_VSS and req.method == "POST":
            async with self.lock:
                return await self.per_lun_vss(req)
        return _error(409, d.message(), "conflict")

    async def per_lun_vss(self, req: HttpRequest) -> HttpResponse:
        """A VSS call that acts on each LUN it names by itself (:data:`routing.PER_LUN_ROUTES`), over LUNs of
        several workers: each worker, in order, gets the call with its own LUNs of every list; the answers' lists
        are put back in the request's order (a list as long as the request's, LUN by LUN) or joined, a yes or no is
        yes only when every worker said yes (AreLunsSupported), and any other value is the first worker's. A worker that
        refuses ends the call with its refusal, what the workers before it did standing, as one process stops at
        the LUN it refuses."""
        body = req.json()
        if not isinstance(body, dict):
            return HttpResponse.of_json(400, {"error": "a JSON object is needed", "code": "E_INVALIDARG"})
        lists = {k: v for k, v in body.items() if isinstance(v, list)}
        where: dict[str, list[int]] = {}  # list -> the worker of each of its LUNs
        for key, items in lists.items():
            where[key] = []
            for item in items:
                name = next((n for n in (self.serial_lun(s) for s in routing.serials(item)) if n), None)
                where[key].append((self.lun_owner(name) if name else None) or 0)
        merged: dict[str, Json] = {}
        for w in sorted({w for ws in where.values() for w in ws}):
            mine = {k: [i for i, x in enumerate(where[k]) if x == w] for k in lists}
            sub = {**body, **{k: [lists[k][i] for i in idx] for k, idx in mine.items()}}
            resp = await self.forward(w, HttpRequest("POST", req.path, req.query,
                                                     (("content-type", "application/json"),),
                                                     json.dumps(sub).encode()))
            if not resp.ok:
                return resp
            out = resp.json()
            for k, v in out.items() if isinstance(out, dict) else ():
                if isinstance(v, bool):
                    merged[k] = merged.get(k, True) is True and v
                elif not isinstance(v, list):
                    merged.setdefault(k, v)
                elif k in lists and len(v) == len(mine[k]):  # one answer per LUN asked: in the request's place
                    have = merged.setdefault(k, [None] * len(lists[k]))
                    assert isinstance(have, list)
                    for i, x in zip(mine[k], v, strict=True):
                        have[i] = x
                else:
                    have = merged.setdefault(k, [])
                    assert isinstance(have, list)
                    have.extend(v)
        return HttpResponse.of_json(200, merged)

    async def resync_luns(self, req: HttpRequest) -> HttpResponse:
        """VSS's ResyncLuns onto LUNs of several workers: each (snapshot LUN, LUN) described by VSS named from the
        catalog by its serial, then the recovery set across workers that ``POST /v1/recovery/resync`` makes,
        answered as VSS's async handle (its refusals in VSS's form)."""
        from lunsync.provider.api_provider import ResyncLunsIn
        from lunsync.provider.vss import RecoverySet, RecoveryState, VssCode, VssError, async_handle
        from lunsync.snapshots.snapcat import SnapshotCatalog
        from pydantic import ValidationError

        def refused(e: VssError) -> HttpResponse:
            return HttpResponse.of_json(e.code.http_status, e.as_dict())

        try:
            body = ResyncLunsIn.model_validate(req.json())
        except ValidationError as e:
            return refused(VssError(VssCode.INVALID_ARG, str(e)))
        if len(body.source_luns) != len(body.target_luns):
            return refused(VssError(VssCode.INVALID_ARG, "ResyncLuns needs as many targets as sources"))
        snaps = {s.serial: s.full_name for s in SnapshotCatalog(self.catalog).list_snapshots()}
        luns = {r.serial: r.name for r in self.catalog.list_luns()}
        pairs: list[Json] = []
        for src, dst in zip(body.source_luns, body.target_luns, strict=True):
            ref = next((snaps[s] for s in routing.serials(src) if s in snaps), None)
            name = next((luns[s] for s in routing.serials(dst) if s in luns), None)
            if ref is None or name is None:
                return refused(VssError(VssCode.OBJECT_NOT_FOUND, f"no {'snapshot' if ref is None else ''} LUN "
                                                                  f"matches {src if ref is None else dst}"))
            pairs.append({"snapshot": ref, "destination": name})
        async with self.lock:
            resp = await self.recovery_sets.create({"pairs": pairs}, body.options())
        st = resp.json()
        if not resp.ok:
            code = {404: VssCode.OBJECT_NOT_FOUND, 400: VssCode.INVALID_ARG}.get(resp.status, VssCode.PROVIDER_VETO)
            return refused(VssError(code, str(st.get("error") if isinstance(st, dict) else st)))
        assert isinstance(st, dict)
        handle = async_handle(RecoverySet(id=str(st["id"]), state=RecoveryState(str(st["state"]))))
        return HttpResponse.of_json(202, handle, (("location", str(handle["query"])),))

    async def recovery_set(self, req: HttpRequest) -> HttpResponse:
        """A recovery set over destinations of several workers (:mod:`lunsync.provider.cross_recovery`): made in
        one call under the control's lock (no LUN moves meanwhile), or asked about (a wait or post-restore may
        take long, so neither holds the lock)."""
        from lunsync.provider.api_provider import ResyncIn
        from pydantic import ValidationError

        # /v1/recovery/ID[/...] or VSS's /v1/provider/async/ID[/...]
        path = req.path.strip("/").split("/")
        rest = path[2:] if path[1:2] == ["recovery"] else path[3:]
        if rest[:1] != ["resync"]:
            if rest[1:] == ["cancel"]:
                async with self.lock:
                    return await self.recovery_sets.request(rest[0], req)
            return await self.recovery_sets.request(rest[0], req)
        try:
            body = ResyncIn.model_validate(req.json())
        except ValidationError as e:
            return _error(422, str(e), "invalid")
        raw = req.json()
        assert isinstance(raw, dict)
        async with self.lock:
            return await self.recovery_sets.create(raw, body.options())

    async def decide(self, d: routing.Decision, req: HttpRequest) -> HttpResponse:
        if isinstance(d, routing.SpansWorkers):
            return await self.across_workers(d, req)
        if isinstance(d, routing.Local):
            return await self.local(d, req)
        if isinstance(d, routing.FanOut):
            return await self.fan_out(d, req)
        if isinstance(d, routing.Place):
            return await self.create_target(d.iqn, req)
        if isinstance(d, routing.MapLun):
            return await self.map_lun(d, req)
        if req.method == "POST" and req.path.rstrip("/") == "/v1/apply":
            return await self.apply(req)
        resp = await self.forward(d.worker, req)
        if resp.ok and req.method not in ("GET", "HEAD"):
            if d.forget_target is not None:
                self.assignment.remove(d.forget_target)
            body = resp.json()
            if d.remember_set and isinstance(body, dict) and isinstance(body.get("id"), str):
                self.sets[body["id"]] = d.worker
            if d.bind_set is not None:
                self.sets[d.bind_set] = d.worker
            if d.refresh:
                await self.refresh_workers()
            else:
                self.sync_portal()
        return resp

    async def vss_call(self, method: str, params: dict[str, Json]) -> HttpResponse:
        """A VSS snapshot set's worker, whose set holds LUNs of other workers: its commit takes the snapshots as one
        set through the two-phase hold (``snapshot-set``, as ``POST /v1/snapshots``), its abort deletes each
        snapshot on its LUN's worker (``snapshot-delete``). Both come while the VSS request that caused them holds
        the control's lock, so they do not take it again."""
        if method == "snapshot-set":
            body = json.dumps({"snapshots": params.get("snapshots"), "set": params.get("set")}).encode()
            return await self.snapshot_set(HttpRequest("POST", "/v1/snapshots", "",
                                                       (("content-type", "application/json"),), body))
        ref = str(params.get("snapshot"))
        return await self.forward(self.lun_owner(ref.partition("@")[0]) or 0,
                                  HttpRequest("DELETE", f"/v1/snapshots/{ref}", "", (), b""))

    async def snapshot_set(self, req: HttpRequest) -> HttpResponse:
        """POST /v1/snapshots over LUNs of several workers: one point in time by the two-phase hold
        (:mod:`lunsync.provider.cross_set`), recorded once here; each snapshot is then shown by its LUN's worker, as
        one process shows it."""
        from lunsync.provider import cross_set
        from lunsync.provider.api import _status_of
        from lunsync.provider.api_snapshots import SnapshotsIn, retried_set
        from lunsync.snapshots.catalog import AlreadyExists, CatalogError
        from lunsync.snapshots.snapcat import SnapshotCatalog, parse_snapshot_name
        from pydantic import ValidationError

        try:
            body = SnapshotsIn.model_validate(req.json())
            specs = [parse_snapshot_name(n) for n in body.snapshots]
        except (ValidationError, CatalogError) as e:
            return _error(422, str(e), "invalid")
        scat = SnapshotCatalog(self.catalog)
        status = 202 if body.kind == "clone" else 201
        try:
            recs, hold_ms = await cross_set.create_set(scat, specs, self.lun_owner, self.call, kind=body.kind,
                                                       pool=body.pool, set_name=body.set, labels=body.labels,
                                                       generation=lambda w: self.pool.workers[w].restarts)
        except AlreadyExists as clash:  # a retried request answers what it made, as one process does
            retry = retried_set(scat, specs, body)
            if retry is None:
                return _error(409, str(clash), "conflict")
            recs, diffs = retry
            if diffs:
                return _error(409, f"snapshot {', '.join(r.full_name for r in recs)} already exists with a "
                                   f"different spec: {'; '.join(diffs)}", "conflict")
            hold_ms, status = 0.0, 200
        except (CatalogError, OSError) as e:
            status = _status_of(e)
            return _error(status, str(e), "conflict" if status == 409 else "not_found" if status == 404 else
                          "invalid")
        shown = []
        for rec in recs:
            one = await self.forward(self.lun_owner(rec.lun_name) or 0, HttpRequest(
                "GET", f"/v1/snapshots/{rec.full_name}", "", (), b""))
            if not one.ok:
                return one
            shown.append(one.json())
        headers: tuple[tuple[str, str], ...] = ()
        if status == 202:  # as one process answers: filling in the background, and where to watch it
            headers = (("location", f"/v1/snapshots/{recs[0].full_name}"),)
        return HttpResponse.of_json(status, {"snapshots": shown, "set": body.set, "hold_ms": round(hold_ms, 3)},
                                    headers)

    async def create_target(self, iqn: str, req: HttpRequest) -> HttpResponse:
        new = self.assignment.owner(iqn) is None
        worker = self.assignment.place(iqn)
        if new:  # the worker learns it owns the target before it is asked to create it
            try:
                await self.call(worker, "refresh", {"targets": self.assignment.owned_by(worker), "open": False})
            except (ChannelClosed, RemoteError):
                self.assignment.remove(iqn)
                return _error(503, f"worker {worker}, where target {iqn} would go, is restarting; retry in a few "
                                   "seconds", "unavailable")
        resp = await self.forward(worker, req)
        if not resp.ok and new:
            self.assignment.remove(iqn)
        self.sync_portal()
        return resp

    async def map_lun(self, d: routing.MapLun, req: HttpRequest) -> HttpResponse:
        """Map a LUN where it can be served: on its own worker's targets, or, unmapped, moved to the target's."""
        t_owner = self.assignment.owner(d.iqn)
        have = self.lun_owner(d.name)
        if t_owner is None or have is None or have == t_owner:
            resp = await self.forward(t_owner or 0, req)
            self.sync_portal()
            return resp
        from lunsync.snapshots.snapcat import SnapshotCatalog

        snaps = SnapshotCatalog(self.catalog).list_snapshots()
        maps = self.catalog.lun_mappings(d.name)
        has_snapshots = any(s.lun_name == d.name for s in snaps)
        if maps or has_snapshots:
            # The LUN stays where it is; the target may go to it, if nothing of the target is live yet.
            iqn = self.catalog.get_target(d.iqn).iqn
            if (not self.catalog.list_mappings(iqn) and not self.server.sessions.of_target(iqn)
                    and not any(s.exposed_target is not None and s.exposed_target.lower() == d.iqn.lower()
                                for s in snaps)):
                self.assignment.move(d.iqn, have)
                log.info("target %s (empty) moves from worker %d to worker %d, which serves lun %s", d.iqn,
                         t_owner, have, d.name)
                await self.refresh_workers()
                resp = await self.forward(have, req)
                self.sync_portal()
                return resp
        if maps:
            shown = ", ".join(iqn for iqn, _ in maps)
            return _error(409, f"lun {d.name!r} is mapped on {shown}, served by worker {have}, and target {d.iqn} "
                               f"is served by worker {t_owner} and already in use: a LUN is served by one worker "
                               "process, so it can only be mapped on that worker's targets; unmap it first to move "
                               "it", "conflict")
        if has_snapshots:
            return _error(409, f"lun {d.name!r} has snapshots, kept by worker {have}, which serves it unmapped, and "
                               f"target {d.iqn} is served by worker {t_owner} and already in use: a LUN with "
                               "snapshots does not move between worker processes; map it on a target of worker "
                               f"{have} (lunsync status)", "conflict")
        try:
            released = await self.call(have, "release", {"lun": d.name})
        except (ChannelClosed, RemoteError) as e:
            return _error(503, f"worker {have}, which holds lun {d.name!r}, cannot hand it over now ({e}); retry",
                          "unavailable")
        if isinstance(released, dict) and isinstance(released.get("refused"), str):
            return _error(409, released["refused"], "conflict")
        resp = await self.forward(t_owner, req)
        await self.refresh_workers()  # a failed mapping gives the LUN back to the worker it came from
        return resp

    def apply_refusals(self, req: HttpRequest, restoring: dict[str, str]) -> list[tuple[str, str]]:
        """What an ``apply`` body would leave unservable (:meth:`Assignment.split`); none for a body the worker's API
        will refuse anyway (it says why). ``restoring``: the LUNs a restore writes -> its recovery set."""
        import warnings

        from lunsync.provider.config import parse_config
        from lunsync.snapshots.snapcat import SnapshotCatalog

        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("config"), str):
            return []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = parse_config(str(body["config"]), source=str(body.get("source", "<api>")))
        except ValueError:  # ConfigError among them
            return []
        wanted = {t.iqn: t for t in cfg.targets}
        kept = [t.iqn for t in self.catalog.list_targets() if t.iqn in wanted]
        order = kept + [t.iqn for t in cfg.targets if t.iqn not in kept]
        with_snapshots = {s.lun_name for s in SnapshotCatalog(self.catalog).list_snapshots()}

        def pinned(name: str) -> str | None:
            if name in restoring:
                return f"is being restored by recovery {restoring[name]}"
            return "has snapshots" if name in with_snapshots else None

        return self.assignment.split([(iqn, [m.name for m in wanted[iqn].luns]) for iqn in order],
                                     [lun.name for lun in cfg.luns], self.lun_owner, pinned, self.catalog.made_from)

    async def apply(self, req: HttpRequest) -> HttpResponse:
        """POST /v1/apply: the whole plan is refused (409) before anything is written if a LUN would be shown by
        targets of two workers, or move with its snapshots or under a restore; a dry run lists that among its
        refused steps."""
        restoring: dict[str, str] = {}
        for w in range(self.count):
            try:
                st = await self.call(w, "status")
            except (ChannelClosed, RemoteError):  # a restarting worker's restores wait for it (interrupted)
                continue
            if isinstance(st, dict) and isinstance(st.get("restoring"), dict):
                restoring.update({str(k): str(v) for k, v in st["restoring"].items()})
        refused = self.apply_refusals(req, restoring)
        body = req.json()
        dry_run = isinstance(body, dict) and body.get("dry_run") is True
        if refused and not dry_run:
            return _error(409, "apply refused: " + "; ".join(f"lun {n!r} {why}" for n, why in refused), "conflict")
        resp = await self.forward(0, req)
        if not resp.ok:
            return resp
        out = resp.json()
        if refused and isinstance(out, dict) and isinstance(out.get("plan"), list) and isinstance(
                out.get("refused"), list):
            steps = [f"! lun {n} {why}" for n, why in refused]
            out["plan"] = [*out["plan"], *steps]
            out["refused"] = [*out["refused"], *steps]
            out["changed"] = len(out["plan"]) > len(out["refused"])
            return HttpResponse.of_json(resp.status, out)
        if not dry_run:
            await self.refresh_workers()
        return resp

    async def fan_out(self, d: routing.FanOut, req: HttpRequest) -> HttpResponse:
        up = [w for w in range(self.count) if self.pool.channel(w) is not None]
        answers = await asyncio.gather(*(self.forward(w, req) for w in up))
        if d.merge == "find":
            for resp in answers:
                if resp.status != 404:
                    return resp
            return answers[-1] if answers else _error(503, "no worker is up; retry in a few seconds", "unavailable")
        bad = next((r for r in answers if not r.ok), None)
        if bad is not None:
            return bad  # a 4xx (a bad query) is the same from every worker
        lists = [(w, r.json()) for w, r in zip(up, answers, strict=True)]
        merged: dict[str, Json] = {}
        for w, items in lists:
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict):
                    continue
                key = str(item.get("iqn" if d.merge == "targets" else "name" if d.merge == "snapshots" else d.key))
                if d.merge == "targets":
                    mine = self.assignment.owner(key) == w
                elif d.merge == "snapshots":
                    mine = self.lun_owner(str(item.get("lun"))) == w
                else:
                    mine = True
                if mine or key not in merged:
                    merged[key] = item
        out = list(merged.values())
        if d.merge == "recovery":
            out = list(merged_list([x for x in out if isinstance(x, dict)]))
        elif d.merge == "concat" and d.key == "tsih":
            from lunsync.provider.api import _session_out

            for tsih, proto in self.server.sessions.items():
                if proto.given is None:  # discovery sessions stay here
                    s = _session_out(tsih, proto)
                    if s is not None:
                        out.append(s.model_dump())
            out.sort(key=lambda s: int(s["tsih"]) if isinstance(s, dict) else 0)
        elif d.merge in ("targets", "snapshots") and lists:
            # The catalog's order, as one process lists them.
            order = {str(item.get("iqn" if d.merge == "targets" else "name")): i
                     for i, item in enumerate(lists[0][1] or []) if isinstance(item, dict)}
            out.sort(key=lambda item: order.get(str(item.get("iqn" if d.merge == "targets" else "name")), 1 << 30)
                     if isinstance(item, dict) else 0)
        return HttpResponse.of_json(200, out)

    async def local(self, d: routing.Local, req: HttpRequest) -> HttpResponse:
        if d.what == "portals":
            return HttpResponse.of_json(200, [{"address": p.text().rsplit(",", 1)[0], "host": p.host, "port": p.port,
                                               "tpgt": p.tpgt} for p in self.directory.portals])
        if d.what == "logout":
            try:
                tsih = int(d.arg)
            except ValueError:
                tsih = -1
            if not 1 <= tsih <= 0xFFFF:
                return _error(422, f"tsih: {d.arg!r} is not a TSIH (1-65535)", "invalid")
            proto = self.server.sessions.get(tsih)
            if proto is None:
                return _error(404, f"no session with TSIH {tsih}", "not_found")
            if proto.given is not None:
                owner = self.assignment.owner(proto.given.target_name)
                return await self.forward(owner or 0, req)
            self.server.force_logout(tsih)
            return HttpResponse(204, (), b"")
        return HttpResponse.of_json(200, await self.status())

    async def status(self) -> dict[str, Json]:
        from lunsync.provider.api import VERSION

        workers: list[dict[str, Json]] = []
        attention: list[str] = []
        luns = connections = 0
        for w in self.pool.workers:
            st: Json = None
            if w.up:
                try:
                    st = await self.call(w.index, "status")
                except (ChannelClosed, RemoteError):
                    st = None
            st = st if isinstance(st, dict) else {}
            names = [str(n) for n in st.get("luns", [])]
            luns += len(names)
            connections += int(st.get("connections", 0))
            attention += [f"worker {w.index}: {a}" for a in st.get("attention", [])]
            workers.append({"index": w.index, "pid": w.pid, "up": bool(st), "restarts": w.restarts,
                            "targets": self.assignment.owned_by(w.index), "luns": names,
                            "sessions": int(st.get("sessions", 0)), "connections": int(st.get("connections", 0))})
            if not st:
                attention.append(f"worker {w.index} is down (restarted {w.restarts} time(s)); its targets answer "
                                 "logins with SERVICE_UNAVAILABLE until it is back")
        return {"version": VERSION, "uptime_s": round(time.monotonic() - self.started, 3),
                "data_dir": self.prep.data_dir, "targets": len(self.catalog.list_targets()), "luns": luns,
                "sessions": len(self.server.sessions), "connections": connections + self.server.counters.connections,
                "portals": [p.text() for p in self.directory.portals], "api": self.api_address,
                "metrics": self.metrics_address, "attention": attention, "workers": workers}

    # -- metrics ------------------------------------------------------------------------------------------------------

    async def expositions(self) -> dict[str, str]:
        """Every process's ``/metrics`` text: the control's own (logins, the API), then each worker's."""
        from lunsync.provider.metrics import build_registry
        from prometheus_client import generate_latest

        if not hasattr(self, "_own_registry"):
            self._own_registry = build_registry(self.server, self.counters, list)
        texts = {"control": generate_latest(self._own_registry).decode()}
        for w in range(self.count):
            try:
                text = await self.call(w, "metrics")
            except (ChannelClosed, RemoteError):
                continue
            if isinstance(text, str):
                texts[f"worker{w}"] = text
        return texts


def _metrics_app(control: Control) -> Any:
    from lunsync.provider.metrics import MergedCollector, metrics_app
    from prometheus_client import CollectorRegistry

    texts: dict[str, str] = {}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(lambda: texts))
    inner = metrics_app(registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            fresh = await control.expositions()
            texts.clear()
            texts.update(fresh)
        await inner(scope, receive, send)

    return app


async def serve_workers(opts: ServeOptions, prep: Prepared, count: int, ready: asyncio.Event | None = None) -> int:
    """``lunsync serve --workers N`` with N = ``count`` (at least 2): start the workers, then the API, metrics and
    portals; stop on SIGTERM."""
    from lunsync.provider.api import READ_ONLY_TOKEN_FILENAME, HttpServer, TokenAuth, body_limit, ensure_token
    from lunsync.provider.daemon import METRICS_PORT, listen_portals, print_banner, stop_event

    if opts.gateway is not None:
        prep.settings.tpgt = opts.gateway.port_group  # the portal's TPGT is this gateway's port group
    control = Control(opts, prep, count, ensure_token(prep.data_dir),
                      ensure_token(prep.data_dir, READ_ONLY_TOKEN_FILENAME))
    index = None
    if opts.gateway is not None:
        from lunsync.provider import control_gateway

        index = await control_gateway.join_gateways(control, opts.gateway)
    await control.pool.start()
    # The workers have resumed or failed their recovery sets: a set across workers that a kill caught between its
    # parts' starts has the parts that did start failed too.
    await control.recovery_sets.settle(list(control.recovery_sets.parts))
    if index is not None:
        await index.start()  # before any initiator: the other gateways' LUNs are served from the start
    log.info("%d worker(s) ready: %s", count, "; ".join(
        f"worker {w.index} (pid {w.pid}): {', '.join(control.assignment.owned_by(w.index)) or 'no targets'}"
        for w in control.pool.workers))
    http: list[HttpServer] = []
    if opts.api != "off":
        try:
            api = await HttpServer.start("API", TokenAuth(body_limit(control.app, opts.api_max_body_bytes), control),
                                         opts.api, 8080, certfile=opts.api_tls_cert, keyfile=opts.api_tls_key)
            http.append(api)
            control.api_address = api.address
        except OSError as e:
            log.error("API: cannot listen on %s: %s; continuing without the API", opts.api, e)
            control.api_address = f"unavailable ({e.strerror or e})"
    if opts.metrics != "off":
        try:
            if opts.metrics.startswith("unix:"):
                raise ValueError("--metrics takes HOST:PORT (Prometheus scrapes over TCP)")
            m = await HttpServer.start("metrics", _metrics_app(control), opts.metrics, METRICS_PORT)
            http.append(m)
            control.metrics_address = m.address + "/metrics"
        except OSError as e:
            log.error("metrics: cannot listen on %s: %s; continuing without metrics", opts.metrics, e)
    bound = await listen_portals(control.server, control.directory, prep)
    print_banner(opts, prep, bound, len(control.directory.targets), control.api_address, control.metrics_address)
    stop = stop_event()
    if ready is not None:
        ready.set()
    systemd.ready(f"serving {len(prep.catalog.list_luns())} LUN(s) on {len(bound)} portal(s) with {count} "
                  f"worker(s); API {control.api_address}")
    await stop.wait()
    systemd.stopping()
    log.info("shutting down: the workers drain their in-flight commands")
    for h in http:
        await h.stop()
    await control.server.stop()
    if index is not None:
        await control_gateway.leave(index)
    await control.pool.stop()  # the workers release their leases: the other gateways own the LUNs at once
    prep.catalog.close()
    log.info("stopped")
    return 0

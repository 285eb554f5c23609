"""Gateways sharing LUNs through a Ceph cluster: what one gateway keeps in RADOS so that the others serve the same LUN
the same way.

Everything lives in the RADOS namespace ``lunsync`` of the gateway pool:

- ``lunsync.gateways``: an omap, gateway id -> ``{"port_group": N}``. Each gateway is one ALUA target port group,
  and its relative target port identifier is its port group number, so both are distinct across gateways.
- ``lunsync.luns``: an omap, LUN name -> the shared LUN's configuration (image, identity, size, targets and LUN
  numbers): what a gateway that did not create the LUN needs to serve it with the same NAA and serial, and the
  mappings every gateway follows. A deleted LUN's entry becomes a tombstone (``"deleted": true`` with its NAA), so
  that a gateway that missed the delete stops serving it rather than publishing it again.
- ``lunsync.pr.<naa>``: the LUN's persistent-reservation state, one JSON document. :class:`RadosPrStore` commits it
  with the object version asserted (compare-and-write: a lost race is ``ERANGE``/``EOVERFLOW``, then the command is
  decided again on fresh state) and then notifies the object's watchers with the new document; each other gateway
  adopts it before it acknowledges, so when a PR command's status reaches the initiator every gateway's conflict
  check already sees it.
- ``lunsync.owner.<naa>``: the LUN's ownership lease, a ``cls_lock`` exclusive lock with a duration (the OSD expires
  it by its own clock) whose cookie is the holder's gateway id, with an ``owner`` xattr naming the holder for the
  others. :class:`OwnershipKeeper` drives :class:`lunsync.provider.lease.Lease` against it and tells the LU the
  owning port group (active/optimized; the others active/non-optimized).
- ``lunsync.gateways`` is also the channel of write holds that span gateways (:class:`PeerHolds`): every gateway
  watches it, a gateway taking a snapshot set notifies "hold these NAAs" and snapshots only once every watcher has
  acknowledged (each has held new writes to those LUNs and seen its writes in flight acknowledged), then notifies
  "release". A watcher that does not acknowledge within ``HOLD_ACK_TIMEOUT_S`` fails the set; a hold whose release
  never comes ends by itself after the time the notify names. The watch's timeout is the lease's, so the cluster
  drops a dead gateway's watch (and sets stop waiting for it) as soon as its LUNs' ownership moves.

librados blocks, so every call runs in a thread; the watch callback arrives on librados' own thread and hands the
document to the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lunsync.provider.lease import Lease
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.pr import StalePr, adopt

log = logging.getLogger("lunsync.gateway")

NAMESPACE = "lunsync"
GATEWAYS_OID = "lunsync.gateways"
LUNS_OID = "lunsync.luns"
_LOCK = "owner"
_OWNER_XATTR = "owner"
_NOTIFY_TIMEOUT_MS = 5000
_ADOPT_TIMEOUT_S = 4.0
_OMAP_MAX = 100000
# How long a gateway taking a snapshot set waits for every other gateway to hold its writes. librados counts a
# notify's timeout in whole seconds (under one second is its 10 s default), so this is the shortest bound there is;
# a healthy gateway answers in about a millisecond on one host.
HOLD_ACK_TIMEOUT_S = 2
_RELEASE_TIMEOUT_MS = 2000
_EARLY_RELEASES = 256  # releases that arrived before their hold, remembered (a late hold is then not taken)


def _rados() -> Any:
    # Imported when first needed: python3-rados is a Debian package that a host without shared LUNs may lack.
    import rados

    return rados


def _create(io: Any, oid: str) -> None:
    """Make the object exist (empty), unless it does."""
    rados = _rados()
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
        io.operate_write_op(op, oid)


def _close_watch(watch: Any, io: Any, oid: str) -> None:
    """Close a watch on ``oid`` (if any) and its ioctx."""
    if watch is not None:
        try:
            watch.close()
        except Exception:  # the cluster may already be gone; closing must not fail shutdown
            log.debug("watch on %s: close failed", oid, exc_info=True)
    io.close()


def pr_oid(naa: str) -> str:
    return f"lunsync.pr.{naa}"


def owner_oid(naa: str) -> str:
    return f"lunsync.owner.{naa}"


def connect(conf_path: str, keyring: str, client: str, timeout_s: int) -> Any:
    """A connected ``rados.Rados`` (cephx as ``client`` with ``keyring``). Blocking."""
    rados = _rados()
    conf = {"keyring": keyring} if keyring else {}
    # The objecter pings every watch once a tick (5 s by default); a tick of 1 s keeps a watch whose timeout is as
    # short as a lease (down to 2 s) alive, so that the cluster can forget a dead gateway's watch that soon.
    conf.update({"rados_osd_op_timeout": str(timeout_s), "rados_mon_op_timeout": str(timeout_s),
                 "client_mount_timeout": str(timeout_s), "objecter_tick_interval": "1"})
    handle = rados.Rados(conffile=conf_path, conf=conf, name=client)
    handle.connect(timeout=timeout_s)
    return handle


class GatewayLink:
    """One gateway's handle on the cluster: its id and port group, and the objects every gateway shares. The
    ``*_sync`` methods block (call them in a thread)."""

    def __init__(self, handle: Any, pool: str, gateway_id: str, port_group: int) -> None:
        self.handle = handle
        self.pool = pool
        self.gateway_id = gateway_id
        self.port_group = port_group

    def ioctx(self) -> Any:
        io = self.handle.open_ioctx(self.pool)
        io.set_namespace(NAMESPACE)
        return io

    def _omap_set(self, oid: str, items: dict[str, bytes]) -> None:
        rados = _rados()
        io = self.ioctx()
        try:
            with rados.WriteOpCtx() as op:
                io.set_omap(op, tuple(items), tuple(items.values()))
                io.operate_write_op(op, oid)
        finally:
            io.close()

    def _omap_get(self, oid: str) -> dict[str, bytes]:
        rados = _rados()
        io = self.ioctx()
        try:
            with rados.ReadOpCtx() as op:
                it, _ = io.get_omap_vals(op, "", "", _OMAP_MAX)
                try:
                    io.operate_read_op(op, oid)
                except rados.ObjectNotFound:
                    return {}
                return {str(k): bytes(v) for k, v in it}
        finally:
            io.close()

    def register_sync(self) -> None:
        """Record this gateway and its port group in ``lunsync.gateways``."""
        self._omap_set(GATEWAYS_OID, {self.gateway_id: json.dumps({"port_group": self.port_group}).encode()})

    def port_groups_sync(self) -> dict[str, int]:
        """Every registered gateway's port group, by gateway id."""
        return {gw: int(json.loads(v)["port_group"]) for gw, v in self._omap_get(GATEWAYS_OID).items()}

    def publish_lun_sync(self, name: str, doc: dict[str, Any]) -> None:
        self._omap_set(LUNS_OID, {name: json.dumps(doc, sort_keys=True).encode()})

    def withdraw_lun_sync(self, name: str, naa: str) -> None:
        """Replace ``name``'s entry with a tombstone: the LUN of that NAA was deleted, and every gateway stops
        serving it. A later LUN of the same name (another NAA) overwrites it."""
        self.publish_lun_sync(name, {"name": name, "naa": naa, "deleted": True, "by": self.gateway_id})

    def luns_sync(self) -> dict[str, dict[str, Any]]:
        """Every shared LUN's published configuration, by name."""
        return {name: json.loads(v) for name, v in self._omap_get(LUNS_OID).items()}

    def close(self) -> None:
        self.handle.shutdown()


class RadosPrStore:
    """A LU's persistent-reservation state in ``lunsync.pr.<naa>`` (see the module text): the shared
    :class:`lunsync.target.scsi.pr.PrStore`."""

    shared = True

    def __init__(self, link: GatewayLink, naa: str) -> None:
        self.link = link
        self.oid = pr_oid(naa)
        self.io = link.ioctx()  # this store's own: get_last_version() is per ioctx
        self.seen = 0  # the object version the state in memory was read at (what a commit asserts)
        self.applied = 0  # the newest version the state in memory reflects (what a notify must exceed)
        self._lu: LogicalUnit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: Any = None

    # -- set-up (blocking) ------------------------------------------------------------------------------------------

    def open_sync(self) -> dict[str, Any]:
        """Create the object if absent and return the state it holds (empty: no registrations)."""
        _create(self.io, self.oid)
        doc, self.seen = self._read()
        self.applied = self.seen
        return doc

    def watch_sync(self, lu: LogicalUnit, loop: asyncio.AbstractEventLoop) -> None:
        """Adopt other gateways' commits into ``lu`` as they are notified."""
        self._lu, self._loop = lu, loop
        self._watch = self.io.watch(self.oid, self._notified, self._watch_error)
        lu.on_reset = self.announce_reset

    def close_sync(self) -> None:
        _close_watch(self._watch, self.io, self.oid)
        self._watch = None

    # -- PrStore ----------------------------------------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, Any], int]:
        data = self.io.read(self.oid, 1 << 20)
        version = int(self.io.get_last_version())
        return (dict(json.loads(data)) if data else {}), version

    async def fetch(self) -> dict[str, Any] | None:
        doc, version = await asyncio.to_thread(self._read)
        self.seen = version
        if version < self.applied:
            return None  # a newer notify arrived while we read: memory is ahead (a commit on `seen` will be stale)
        self.applied = version
        return doc

    def _write(self, doc: dict[str, Any], seen: int) -> int:
        rados = _rados()
        body = json.dumps(doc, sort_keys=True)
        with rados.WriteOpCtx() as op:
            op.assert_version(seen)
            op.write_full(body.encode())
            try:
                self.io.operate_write_op(op, self.oid)
            except rados.OSError as e:
                if e.errno in (errno.ERANGE, errno.EOVERFLOW):
                    raise StalePr() from None
                raise
        version = int(self.io.get_last_version())
        try:
            # Returns once every watching gateway has adopted it (or the timeout: a dead gateway adopts on start).
            self.io.notify(self.oid, json.dumps({"v": version, "from": self.link.gateway_id, "doc": doc}),
                           _NOTIFY_TIMEOUT_MS)
        except rados.Error as e:
            log.warning("pr %s: committed version %d, but not every gateway acknowledged it: %s", self.oid, version, e)
        return version

    async def commit(self, doc: dict[str, Any]) -> None:
        version = await asyncio.to_thread(self._write, doc, self.seen)
        self.seen = version
        if version > self.applied:
            # An older notify may have been adopted while this commit was in flight: memory is ours again.
            self.applied = version
            if self._lu is not None:
                self._lu.pr.apply(doc)

    # -- the watch (librados' thread) -------------------------------------------------------------------------------

    def announce_reset(self, asc: tuple[int, int]) -> Awaitable[None] | None:
        """A LUN or target reset happened here: the other gateways' nexuses get its unit attention too (SAM-5
        §6.3.3). Returns what completes once they have it (the TMF response waits for that)."""
        loop = self._loop
        if loop is None:
            return None
        msg = json.dumps({"event": "reset", "asc": list(asc), "from": self.link.gateway_id})
        return loop.run_in_executor(None, self._notify_quietly, msg)

    def _notify_quietly(self, msg: str) -> None:
        try:
            self.io.notify(self.oid, msg, _NOTIFY_TIMEOUT_MS)
        except _rados().Error as e:
            log.warning("pr %s: a reset was not acknowledged by every gateway: %s", self.oid, e)

    def _notified(self, notify_id: int, notifier_id: str, watch_id: int, data: bytes) -> None:
        loop = self._loop
        try:
            msg = json.loads(data)
            sender = str(msg["from"])
            if sender == self.link.gateway_id or loop is None:
                return
            if msg.get("event") == "reset":
                asc = (int(msg["asc"][0]), int(msg["asc"][1]))
                done = asyncio.run_coroutine_threadsafe(self._reset(asc), loop)
                done.result(_ADOPT_TIMEOUT_S)  # acknowledged once every nexus here has the unit attention
                return
            version, doc = int(msg["v"]), dict(msg["doc"])
        except (ValueError, KeyError, TypeError, IndexError):
            log.warning("pr %s: ignoring a notify that is neither a PR state nor a reset", self.oid)
            return
        except (TimeoutError, asyncio.CancelledError):
            log.warning("pr %s: a peer's reset took too long to apply", self.oid)
            return
        fut = asyncio.run_coroutine_threadsafe(self._adopt(version, doc), loop)
        try:
            fut.result(_ADOPT_TIMEOUT_S)  # acknowledge only once adopted: the sender's command waits for this
        except (TimeoutError, asyncio.CancelledError):  # a late adoption still happens; the next PR command re-reads
            log.warning("pr %s: adopting version %d took too long", self.oid, version)

    async def _reset(self, asc: tuple[int, int]) -> None:
        if self._lu is not None:
            self._lu.reset(asc=asc, from_peer=True)

    async def _adopt(self, version: int, doc: dict[str, Any]) -> None:
        if version <= self.applied or self._lu is None:
            return
        self.applied = version
        adopt(self._lu, doc)

    def _watch_error(self, err: int) -> None:
        # The watch lapsed (an OSD restart, a network cut): re-establish it and re-read, since notifies were missed.
        log.warning("pr %s: watch lost (%d); re-establishing", self.oid, err)
        lu, loop = self._lu, self._loop
        if lu is None or loop is None:
            return
        try:
            old, self._watch = self._watch, None
            if old is not None:
                old.close()
            self._watch = self.io.watch(self.oid, self._notified, self._watch_error)
            doc, version = self._read()
            asyncio.run_coroutine_threadsafe(self._adopt(version, doc), loop)
        except Exception:  # the next PR command re-reads; the log says the conflict check may lag
            log.exception("pr %s: cannot re-establish the watch", self.oid)


@dataclass
class OwnershipKeeper:
    """Keeps a shared LU's ownership lease (``lunsync.owner.<naa>``) and tells the LU which port group owns it."""

    link: GatewayLink
    naa: str
    lu: LogicalUnit
    lease: Lease
    groups: Callable[[], dict[str, int]]  # gateway id -> port group, as last read from lunsync.gateways

    def __post_init__(self) -> None:
        self.oid = owner_oid(self.naa)
        self.io = self.link.ioctx()
        self._announced: str | None = None  # the holder named in the owner xattr by us

    def _try(self) -> tuple[bool, str | None]:
        rados = _rados()
        me = self.link.gateway_id
        try:
            self.io.lock_exclusive(self.oid, _LOCK, me, f"lunsync gateway {me}", int(self.lease.duration_s), 1)
        except rados.ObjectBusy:
            try:
                owner = bytes(self.io.get_xattr(self.oid, _OWNER_XATTR)).decode()
            except rados.Error:
                owner = None
            self._announced = None
            return False, owner
        if self._announced != me:
            self.io.set_xattr(self.oid, _OWNER_XATTR, me.encode())
            self._announced = me
        return True, me

    def _release(self) -> None:
        rados = _rados()
        try:
            self.io.unlock(self.oid, _LOCK, self.link.gateway_id)
        except rados.Error:
            pass

    def _publish(self, owner: str | None) -> None:
        group = self.groups().get(owner) if owner is not None else None
        self.lu.set_alua_owner(group)

    async def run(self) -> None:
        """Acquire and renew for ever; on cancellation release the lease so another gateway takes over at once."""
        rados = _rados()
        loop = asyncio.get_running_loop()
        lease = self.lease
        try:
            while True:
                now = loop.time()
                if lease.due(now):
                    sent = lease.sent(now)
                    try:
                        got, owner = await asyncio.to_thread(self._try)
                    except rados.Error as e:
                        log.warning("lease %s: %s", self.oid, e)
                        lease.failed(loop.time())
                    else:
                        if got:
                            lease.acquired(sent, loop.time())
                        else:
                            lease.busy(owner, loop.time())
                now = loop.time()
                self._publish(lease.view(now).owner)
                await asyncio.sleep(max(0.05, lease.next_deadline(now) - now))
        except asyncio.CancelledError:
            lease.released()
            await asyncio.to_thread(self._release)
            raise

    def close_sync(self) -> None:
        self.io.close()


class PeersNotHeld(Exception):
    """Not every gateway acknowledged a write hold within the bound; the holds that were taken are released."""


@dataclass
class _PeerHold:
    lus: list[LogicalUnit]
    released: asyncio.Event
    task: asyncio.Task[None] | None = None


class PeerHolds:
    """Write holds on shared LUNs that span every gateway, through watch/notify on ``lunsync.gateways``.

    The taking side (:meth:`hold_sync`, :meth:`release_sync`, both blocking) notifies ``{"event": "hold", "id",
    "naas", "expires_s"}`` and returns once every watching gateway has acknowledged, or raises
    :class:`PeersNotHeld`. The watching side holds the write gate of each named LUN it serves (``resolve`` maps NAAs
    to this gateway's LUs) and acknowledges only once it holds every one, i.e. its writes to them in flight have been
    acknowledged and new ones queue; it releases them on the matching ``release`` or after ``expires_s``, whichever
    comes first, so a taker that died mid-set never leaves another gateway's writes held."""

    def __init__(self, link: GatewayLink, resolve: Callable[[Sequence[str]], list[LogicalUnit]],
                 watch_timeout_s: int) -> None:
        self.link = link
        self.resolve = resolve
        self.watch_timeout_s = watch_timeout_s
        self.io = link.ioctx()
        self.oid = GATEWAYS_OID
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: Any = None
        self._holds: dict[str, _PeerHold] = {}  # hold id -> what this gateway holds for another's set (event loop)
        self._early: dict[str, None] = {}  # ids released before their hold arrived (ordered: oldest first)

    # -- set-up (blocking) ------------------------------------------------------------------------------------------

    def open_sync(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        _create(self.io, self.oid)
        self._watch = self.io.watch(self.oid, self._notified, self._watch_error, self.watch_timeout_s)

    def close_sync(self) -> None:
        _close_watch(self._watch, self.io, self.oid)
        self._watch = None

    # -- the taking gateway (blocking) ------------------------------------------------------------------------------

    def hold_sync(self, hold_id: str, naas: Sequence[str], expires_s: float) -> None:
        """Every other gateway holds writes to ``naas`` on return. Raises :class:`PeersNotHeld` when one did not
        acknowledge within ``HOLD_ACK_TIMEOUT_S`` (the caller releases ``hold_id`` then, as always)."""
        rados = _rados()
        msg = json.dumps({"event": "hold", "id": hold_id, "from": self.link.gateway_id, "naas": list(naas),
                          "expires_s": expires_s})
        try:
            self.io.notify(self.oid, msg, HOLD_ACK_TIMEOUT_S * 1000)
        except rados.TimedOut:
            raise PeersNotHeld(f"not every gateway held its writes within {HOLD_ACK_TIMEOUT_S} s (one that stopped "
                               "is waited for until its lease runs out)") from None
        except rados.Error as e:
            raise PeersNotHeld(f"the other gateways could not be asked to hold their writes: {e}") from None

    def release_sync(self, hold_id: str) -> None:
        """Tell every gateway that hold ``hold_id`` is over. A gateway that misses it releases at its expiry."""
        msg = json.dumps({"event": "release", "id": hold_id, "from": self.link.gateway_id})
        try:
            self.io.notify(self.oid, msg, _RELEASE_TIMEOUT_MS)
        except _rados().Error as e:
            log.warning("hold %s: not every gateway acknowledged its release (each ends it by itself): %s", hold_id, e)

    # -- the watching gateways (librados' threads, then the event loop) ---------------------------------------------

    def _notified(self, notify_id: int, notifier_id: str, watch_id: int, data: bytes) -> None:
        loop = self._loop
        try:
            msg = json.loads(data)
            if str(msg["from"]) == self.link.gateway_id or loop is None:
                return
            event, hold_id = str(msg["event"]), str(msg["id"])
            if event == "release":
                loop.call_soon_threadsafe(self._release, hold_id)
                return
            if event != "hold":
                return
            naas, expires_s, sender = [str(n) for n in msg["naas"]], float(msg["expires_s"]), str(msg["from"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: ignoring a notify that is neither a hold nor a release", self.oid)
            return
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop.call_soon_threadsafe(self._begin, hold_id, naas, expires_s, sender, ready)
        try:
            ready.result(HOLD_ACK_TIMEOUT_S)  # acknowledge only once held: the taker snapshots after every ack
        except concurrent.futures.TimeoutError:
            log.warning("hold %s of gateway %s: writes did not drain within %d s; its set fails", hold_id, sender,
                        HOLD_ACK_TIMEOUT_S)

    def _begin(self, hold_id: str, naas: list[str], expires_s: float, sender: str,
               ready: concurrent.futures.Future[None]) -> None:
        if hold_id in self._early or hold_id in self._holds:
            self._early.pop(hold_id, None)
            ready.set_result(None)
            return
        lus = self.resolve(naas)
        if not lus:
            ready.set_result(None)  # none of those LUNs is served here
            return
        hold = self._holds[hold_id] = _PeerHold(lus, asyncio.Event())
        hold.task = asyncio.get_running_loop().create_task(self._keep(hold_id, hold, expires_s, sender, ready),
                                                           name=f"hold {hold_id}")

    async def _keep(self, hold_id: str, hold: _PeerHold, expires_s: float, sender: str,
                    ready: concurrent.futures.Future[None]) -> None:
        t0 = time.perf_counter()
        try:
            async with contextlib.AsyncExitStack() as gates:
                try:
                    async with asyncio.timeout(expires_s):
                        for lu in hold.lus:
                            await gates.enter_async_context(lu.gate.exclusive(0, lu.num_blocks))
                        held = time.perf_counter()
                        if not ready.done():
                            ready.set_result(None)
                        await hold.released.wait()
                except TimeoutError:
                    log.warning("hold %s of gateway %s: no release within %.1f s; writes resume", hold_id, sender,
                                expires_s)
                    return
            log.info("hold %s of gateway %s: writes held %.2f ms (drain %.2f)", hold_id, sender,
                     (time.perf_counter() - t0) * 1000, (held - t0) * 1000)
        finally:
            if not ready.done():
                ready.set_result(None)
            self._holds.pop(hold_id, None)

    def _release(self, hold_id: str) -> None:
        hold = self._holds.get(hold_id)
        if hold is not None:
            hold.released.set()
            return
        self._early[hold_id] = None  # its hold has not arrived yet (librados delivers notifies on several threads)
        while len(self._early) > _EARLY_RELEASES:
            del self._early[next(iter(self._early))]

    def _watch_error(self, err: int) -> None:
        log.warning("%s: hold watch lost (%d); re-establishing", self.oid, err)
        try:
            old, self._watch = self._watch, None
            if old is not None:
                old.close()
            self._watch = self.io.watch(self.oid, self._notified, self._watch_error, self.watch_timeout_s)
        except Exception:  # until it is back, this gateway does not hold for the others' sets
            log.exception("%s: cannot re-establish the hold watch", self.oid)

    async def close(self) -> None:
        """Release every hold this gateway keeps for another's set (the daemon is stopping)."""
        for hold in list(self._holds.values()):
            hold.released.set()
        tasks = [h.task for h in self._holds.values() if h.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def new_hold_id() -> str:
    return uuid.uuid4().hex

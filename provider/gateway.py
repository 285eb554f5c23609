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

librados blocks, so every call runs in a thread; the watch callback arrives on librados' own thread and hands the
document to the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import Awaitable, Callable
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


def _rados() -> Any:
    # Imported when first needed: python3-rados is a Debian package that a host without shared LUNs may lack.
    import rados

    return rados


def pr_oid(naa: str) -> str:
    return f"lunsync.pr.{naa}"


def owner_oid(naa: str) -> str:
    return f"lunsync.owner.{naa}"


def connect(conf_path: str, keyring: str, client: str, timeout_s: int) -> Any:
    """A connected ``rados.Rados`` (cephx as ``client`` with ``keyring``). Blocking."""
    rados = _rados()
    conf = {"keyring": keyring} if keyring else {}
    conf.update({"rados_osd_op_timeout": str(timeout_s), "rados_mon_op_timeout": str(timeout_s),
                 "client_mount_timeout": str(timeout_s)})
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
        rados = _rados()
        with rados.WriteOpCtx() as op:
            op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
            self.io.operate_write_op(op, self.oid)
        doc, self.seen = self._read()
        self.applied = self.seen
        return doc

    def watch_sync(self, lu: LogicalUnit, loop: asyncio.AbstractEventLoop) -> None:
        """Adopt other gateways' commits into ``lu`` as they are notified."""
        self._lu, self._loop = lu, loop
        self._watch = self.io.watch(self.oid, self._notified, self._watch_error)
        lu.on_reset = self.announce_reset

    def close_sync(self) -> None:
        if self._watch is not None:
            try:
                self._watch.close()
            except Exception:  # the cluster may already be gone; closing must not fail shutdown
                log.debug("pr watch on %s: close failed", self.oid, exc_info=True)
            self._watch = None
        self.io.close()

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

"""The daemon: wires the catalog, the storage engine, the SCSI targets and the iSCSI portals together.

``lunsync serve`` lands in :func:`run`. The catalog in the data dir is the source of truth; ``--config`` applies a TOML
file to it and ``--demo`` makes sure the demo target exists. :class:`Array` holds the live objects built from the
catalog (backends, logical units, targets) and is what the management API mutates: each of its management methods
commits the catalog transaction first and then changes the live objects, so an acknowledged change survives kill -9
and a crash in between is rolled forward at the next start. The daemon also runs the API and the metrics endpoint on
its own event loop and tells systemd when it is ready. SIGTERM stops accepting, lets in-flight commands finish,
flushes every LUN and exits 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lunsync.provider import systemd
from lunsync.provider.backing_paths import BackingIndex, real_lun_path, removable
from lunsync.provider.config import ChapConfig, Config, LunConfig, LunMapping, TargetConfig, format_size
from lunsync.provider.name_locks import NameLocks, by_name
from lunsync.provider.snapshot_service import SnapshotService
from lunsync.snapshots.backend import FileBackend, StoreSpec, UnavailableStore, open_store
from lunsync.snapshots.catalog import Catalog, InUse, LunRecord, NotFound, Plan, lun_identity
from lunsync.snapshots.cow import DEFAULT_STAGING_BYTES
from lunsync.snapshots.device import BlockDevice, StoreSnapshots
from lunsync.snapshots.errors import OutOfSpace, StorageError
from lunsync.snapshots.model import CephConfig, default_lun_path
from lunsync.snapshots.rbd import image_size, remove_image
from lunsync.target import native
from lunsync.target.directory import ChapCredentials, Directory, PortalAddress, TargetEntry
from lunsync.target.login import LoginResult
from lunsync.target.portal import PortalSettings, Server
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.target import ScsiTarget

if TYPE_CHECKING:
    from lunsync.provider.metrics import ApiCounters
    from lunsync.provider.shared_luns import GatewaySettings, SharedLuns
    from lunsync.provider.vss import HardwareProvider, RecoveryManager
    from prometheus_client import CollectorRegistry

log = logging.getLogger("lunsync.daemon")

DEMO_IQN = "iqn.2026-11.io.lunsync:demo"
DEMO_LUN = "demo0"
DEFAULT_LISTEN = "127.0.0.1:3260"
DEFAULT_API = "127.0.0.1:8080"
# Not 9100, node_exporter's, which most hosts already run; Prometheus' exporter range 9100-9999 is fully allocated
# on paper, and 9476 is not a port any exporter commonly found beside a storage array uses.
METRICS_PORT = 9476
DEFAULT_METRICS = f"127.0.0.1:{METRICS_PORT}"


def parse_hostport(text: str, default_port: int = 3260) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST``. Raises ValueError with the offending text."""
    t = text.strip()
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_s = rest[1:]
    elif t.count(":") == 1:
        host, port_s = t.split(":")
    elif ":" in t:
        return t, default_port  # bare IPv6
    else:
        return t, default_port
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host or "0.0.0.0", port


@dataclass
class LiveLun:
    name: str
    device: BlockDevice
    lu: LogicalUnit


@dataclass
class Array:
    """The live array: every object the catalog describes, opened and ready."""

    data_dir: str
    catalog: Catalog
    directory: Directory = field(default_factory=Directory)
    luns: dict[str, LiveLun] = field(default_factory=dict)
    server: Server | None = None  # set once the portals exist; sessions are logged out through it
    snapshots: SnapshotService | None = None  # set by load(); every LUN opened after that has copy-on-write
    recovery: RecoveryManager | None = None  # set by resync_array.attach, for the API
    # set by shared_luns.attach (serve --gateway): this daemon is one of several gateways of the rbd LUNs
    gateways: SharedLuns | None = None
    port_group: int = 1  # this daemon's ALUA target port group, TPGT and relative target port identifier
    # create/delete/resize/apply of one LUN name run one at a time (see lunsync.provider.name_locks)
    name_locks: NameLocks = field(default_factory=NameLocks)
    backing: BackingIndex = field(default_factory=BackingIndex)  # which live LUN serves which file
    ceph: CephConfig = field(default_factory=CephConfig)  # the cluster of the RBD-backed LUNs ([ceph] in --config)
    _reopening: set[asyncio.Task[None]] = field(default_factory=set)  # LUNs whose store is retried (open_lun)
    provider: HardwareProvider | None = None  # likewise
    # Per LUN: first writes after a snapshot acknowledged before their copy is durable (WCE=1); 0: none (the
    # default here; ``lunsync serve`` passes its --write-staging, DEFAULT_STAGING_BYTES unless told otherwise).
    write_staging_bytes: int = 0
    # A worker of ``serve --workers``: the targets (lowercase IQNs) this process serves, None: every one. A LUN is
    # served by the worker of its Catalog.home_target (the first target it is mapped on; unmapped and made from a
    # snapshot, that of the snapshot's LUN), as the control routes it, so no LUN is ever open in two processes; any
    # other unmapped LUN by the worker with ``holds_unmapped``.
    owned_targets: set[str] | None = None
    holds_unmapped: bool = True
    # A worker's call to the control: how it reads a snapshot that another worker serves (remote_snapshot).
    remote_call: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None

    def serves_target(self, iqn: str) -> bool:
        return self.owned_targets is None or iqn.lower() in self.owned_targets

    def serves_lun(self, name: str) -> bool:
        if self.owned_targets is None:
            return True
        try:
            home = self.catalog.home_target(name)
        except NotFound:  # a deleted origin's snapshots (a clone outlives it) stay with the unmapped LUNs
            return self.holds_unmapped
        return self.serves_target(home) if home is not None else self.holds_unmapped

    async def load(self) -> None:
        if self.snapshots is None:
            self.snapshots = SnapshotService(self)
        for rec in self.catalog.list_luns():
            if self.serves_lun(rec.name):
                live = await self.open_lun(rec.name)
                await self._roll_forward_size(live, rec)
        for t in self.catalog.list_targets():
            if self.serves_target(t.iqn):
                self.build_target(t.iqn)
        await self.snapshots.load()

    def _cow(self, rec: LunRecord, backend: BlockDevice) -> BlockDevice:
        """What the SCSI layer writes through: the backend behind copy-on-write, so snapshots stay intact; a store
        that keeps its own snapshots (RBD) as it is, and so is one the copy-on-write engine cannot work on (no
        descriptor: a store that could not be opened)."""
        if (self.snapshots is None or isinstance(backend, StoreSnapshots)
                or not self.snapshots.copies_on_write(backend)):
            return backend
        return self.snapshots.wrap(rec, backend)

    async def _roll_forward_size(self, live: LiveLun, rec: LunRecord) -> None:
        """Finish a resize a crash interrupted. Never shrinks: either side being larger means a grow was asked for."""
        have = live.device.num_blocks * live.device.block_size
        if have < rec.size_bytes and isinstance(live.device, FileBackend):
            log.warning("lun %s: backing file holds %s, catalog says %s: growing it", rec.name, format_size(have),
                        format_size(rec.size_bytes))
            try:
                await live.lu.device.resize(rec.num_blocks)  # through the volume, which keeps the geometry
            except (StorageError, OSError) as e:  # serve what is there rather than not at all; the log says why
                log.error("lun %s: cannot grow the backing file: %s", rec.name, e)
        elif have > rec.size_bytes and have % rec.block_size == 0:
            # resize_lun grows the file before committing; a crash in between leaves the file larger.
            log.warning("lun %s: backing file holds %s, catalog says %s: completing the interrupted grow", rec.name,
                        format_size(have), format_size(rec.size_bytes))
            self.catalog.resize_lun(rec.name, have)

    def _store(self, rec: LunRecord, create: bool = False) -> StoreSpec:
        return StoreSpec(self.catalog.lun_path(rec), rec.size_bytes, rec.block_size, rec.thin, rec.read_only,
                         ceph=self.ceph if rec.backend == "rbd" else None, create=create)

    async def open_lun(self, name: str, *, create: bool = False) -> LiveLun:
        """Open a recorded LUN's store and serve it. ``create`` lets an RBD LUN create its missing image (``lun
        create``); a daemon reopening its LUNs never does, so an image deleted behind its back is an error, not a
        new empty disk."""
        rec = self.catalog.get_lun(name)
        store = self._store(rec, create)
        # The backend the LUN's configuration names; opening may create (a thick file allocates every block) or
        # reach a cluster: never on the loop.
        try:
            device: BlockDevice = await asyncio.to_thread(open_store, rec.backend, store)
        except StorageError as e:
            if create or rec.backend != "rbd":
                raise
            # A cluster that is down (or an image gone) when the daemon starts must not keep the other LUNs from
            # being served: this one answers NOT READY until it opens.
            log.error("lun %s: %s; it answers NOT READY and is retried every %g s", name, e, REOPEN_S)
            device = UnavailableStore(f"lun {name}", rec.block_size, rec.num_blocks, str(e))
            self._reopen_later(name, store)
        pr_dir = os.path.join(self.data_dir, "pr")
        os.makedirs(pr_dir, mode=0o700, exist_ok=True)
        lu = LogicalUnit(self._cow(rec, device), lun_identity(rec), aptpl_path=os.path.join(pr_dir, f"{rec.name}.json"), name=name)
        live = LiveLun(name, device, lu)
        self.luns[name] = live
        if rec.backend != "rbd":  # an image on the cluster is no file here to alias
            self.backing.add(name, store.path)
        if self.gateways is not None and rec.backend == "rbd":
            await self.gateways.share(live, rec)
        return live

    def _reopen_later(self, name: str, store: StoreSpec) -> None:
        async def retry() -> None:
            while True:
                await asyncio.sleep(REOPEN_S)
                live = self.luns.get(name)
                if live is None or not isinstance(live.device, UnavailableStore):
                    return  # deleted, or reopened some other way meanwhile
                try:
                    device = await asyncio.to_thread(open_store, self.catalog.get_lun(name).backend, store)
                except StorageError as e:
                    log.debug("lun %s: still not available: %s", name, e)
                    continue
                if self.luns.get(name) is not live:
                    await device.close()
                    return
                live.device = device
                live.lu.device = self._cow(self.catalog.get_lun(name), device)
                log.info("lun %s: its store opened; serving it", name)
                return

        task = asyncio.get_running_loop().create_task(retry())
        self._reopening.add(task)
        task.add_done_callback(self._reopening.discard)

    def check_backing_path(self, name: str, path: str | None) -> None:
        """Refuse a new LUN's path by the rules of :mod:`lunsync.provider.backing_paths`, on the real file."""
        where = os.path.normpath(os.path.join(self.catalog.data_dir, path or default_lun_path(name)))
        pools = [(p.name, p.path) for p in self.snapshots.cat.list_pools()] if self.snapshots is not None else []
        real = real_lun_path(name, where, self.data_dir, pools)
        self.backing.refuse_alias(name, real, self.luns)

    def build_target(self, iqn: str) -> TargetEntry:
        t = self.catalog.get_target(iqn)
        existing = self.directory.lookup(iqn)
        scsi = existing.scsi if existing is not None else ScsiTarget(t.iqn, port_groups={self.port_group:
                                                                                         (self.port_group,)})
        wanted: dict[int, LogicalUnit] = {}
        for m in self.catalog.list_mappings(iqn):
            live = self.luns.get(m.name)
            if live is not None:
                wanted[m.lun] = live.lu
            else:  # a worker's: the LUN is mapped on another worker's target first, and served there
                log.warning("target %s: lun %s is served by another worker process, not shown here", iqn, m.name)
        if self.snapshots is not None:
            wanted.update(self.snapshots.exposed_on(t.iqn))
        for n in list(scsi.luns):
            if n not in wanted or scsi.luns[n] is not wanted[n]:
                scsi.remove_lun(n)
        for n, lu in wanted.items():
            if n not in scsi.luns:
                scsi.add_lun(n, lu)
        chap_rec = self.catalog.get_chap(iqn)
        chap = None
        if chap_rec is not None:
            chap = ChapCredentials(chap_rec.user, chap_rec.secret, chap_rec.mutual_user, chap_rec.mutual_secret)
        entry = TargetEntry(t.iqn, scsi, alias=t.alias or "", acl=frozenset(a.lower() for a in
                                                                              self.catalog.list_acls(iqn)), chap=chap)
        self.directory.add(entry)
        return entry

    # -- management operations: the catalog transaction first, then the live objects -------------------------------

    def _logout(self, which: Callable[[LoginResult], bool]) -> int:
        """Force out every session for which ``which(login result)`` holds."""
        if self.server is None:
            return 0
        victims = []
        for tsih, proto in list(self.server.sessions.items()):
            r = proto.conn.result if proto.conn is not None else None
            if r is not None and which(r):
                victims.append(tsih)
        for tsih in victims:
            self.server.force_logout(tsih)
        return len(victims)

    async def create_target(self, iqn: str, alias: str = "") -> TargetConfig:
        t = self.catalog.create_target(iqn, alias)
        self.build_target(t.iqn)
        log.info("target %s created", t.iqn)
        return t

    async def delete_target(self, iqn: str, *, force: bool = False) -> None:
        iqn = self.catalog.get_target(iqn).iqn
        with self.catalog.transaction():
            self.catalog.delete_target(iqn, force=force)
            if self.owned_targets is not None and force:
                # As an unmap (unmap_lun): the LUNs it showed move to another worker when it was their home target;
                # one a restore writes stays, and the target with it (the rollback).
                self._refuse_if_restoring([n for n in self.luns if not self.serves_lun(n)],
                                          f"moved to another worker process by deleting target {iqn}")
        self.directory.remove(iqn)
        n = self._logout(lambda r: r.target is not None and r.target.name == iqn)
        log.info("target %s deleted (%d session(s) logged out)", iqn, n)

    @by_name(lambda _, name, *__, **___: (name,))
    async def create_lun(self, name: str, size_bytes: int | None, *, path: str | None = None, block_size: int = 512,
                         thin: bool = True, read_only: bool = False, backend: str = "",
                         labels: dict[str, str] | None = None) -> LunRecord:
        """Record the LUN, then create (or adopt) its backing store. An existing file, device or RBD image is
        served as it is only when its size is the requested one; otherwise nothing is left behind. An RBD LUN
        (``path`` is ``POOL/IMAGE``) without a size attaches the existing image at its own size."""
        if backend == "rbd":
            if path is None:
                raise ValueError(f"lun {name!r}: an rbd LUN names its image (pool and image)")
            if size_bytes is None:
                size_bytes = await asyncio.to_thread(image_size, self.ceph, path)
        else:
            if size_bytes is None:
                raise ValueError(f"lun {name!r}: a size is required (only an rbd LUN takes its image's)")
            self.check_backing_path(name, path)
        rec = self.catalog.create_lun(name, size_bytes, path=path, block_size=block_size, thin=thin,
                                      read_only=read_only, backend=backend, labels=labels)
        try:
            if rec.backend == "file" and not thin and not os.path.exists(self.catalog.lun_path(rec)):
                _check_space(self.catalog.lun_path(rec), size_bytes)
            live = await self.open_lun(rec.name, create=True)
            have = live.device.num_blocks * live.device.block_size
            if have != rec.size_bytes and rec.backend == "rbd":
                raise ValueError(f"rbd image {rec.path} already exists and holds {have} bytes, not {rec.size_bytes}; "
                                 "leave out the size to serve it at its own")
            if have != rec.size_bytes:
                raise ValueError(f"{self.catalog.lun_path(rec)} already exists and holds {have} bytes, not "
                                 f"{rec.size_bytes}; create the LUN with --size {have} to serve it as it is")
        except BaseException:
            dropped = self.luns.pop(rec.name, None)
            if dropped is not None:
                await dropped.device.close()
            self.catalog.delete_lun(rec.name)
            raise
        log.info("lun %s created: %s, block size %d, %s%s, %s backend at %s", rec.name, format_size(rec.size_bytes),
                 rec.block_size, "thin" if rec.thin else "thick", ", read-only" if rec.read_only else "",
                 rec.backend, self.catalog.lun_path(rec))
        return rec

    @by_name(lambda _, name, *__, **___: (name,))
    async def delete_lun(self, name: str, *, delete_image: bool = False) -> LunRecord:
        """Forget a LUN (refused while mapped). A backing file inside the data dir goes with it; a file or device
        elsewhere was the user's before and stays. An RBD image stays unless ``delete_image``, and then goes once
        the LUN is forgotten (refused by the cluster while the image has snapshots or another client has it
        open: the LUN is gone, the image kept, and the error says so)."""
        if delete_image and self.catalog.get_lun(name).backend != "rbd":
            raise ValueError(f"lun {name!r} is not on an rbd image: there is no image to delete")
        self._refuse_if_restoring([name], "deleted")
        if self.snapshots is not None:
            await self.snapshots.release_origin(name)  # refused while snapshots depend on it
        rec = self.catalog.delete_lun(name)
        if self.gateways is not None and rec.backend == "rbd":
            await self.gateways.unshare(name, unpublish=True, naa=rec.naa)
        live = self.luns.pop(rec.name, None)
        if live is not None:
            await live.device.close()
        path = self.catalog.lun_path(rec)
        removed = removable(rec, path)
        if removed:
            os.unlink(path)
        pr = os.path.join(self.data_dir, "pr", f"{rec.name}.json")
        if os.path.exists(pr):
            os.unlink(pr)
        if delete_image:
            try:
                await asyncio.to_thread(remove_image, self.ceph, rec.path)
            except StorageError as e:
                raise StorageError(f"lun {rec.name} deleted, but {e}") from None
            log.info("lun %s deleted with rbd image %s", rec.name, rec.path)
            return rec
        if removed:
            log.info("lun %s deleted with %s", rec.name, path)
        else:
            log.info("lun %s deleted; kept %s (lunsync did not create it there)", rec.name, path)
        return rec

    @by_name(lambda _, name, *__, **___: (name,))
    async def resize_lun(self, name: str, size_bytes: int) -> LunRecord:
        """Grow a LUN live and tell its sessions (CAPACITY DATA HAS CHANGED). Shrinking is refused.

        The one operation that touches the file before the catalog: growing can fail (EFBIG, ENOSPC on a thick
        LUN) and the catalog cannot shrink back, so the file grows first and the catalog commits after. A crash in
        between leaves a larger file, which :meth:`load` adopts. Initiators only learn of the new size after the
        commit."""
        rec = self.catalog.get_lun(name)
        if size_bytes == rec.size_bytes:
            return rec
        if size_bytes < rec.size_bytes:
            return self.catalog.resize_lun(name, size_bytes)  # raises Invalid with the catalog's wording
        if size_bytes % rec.block_size:
            raise ValueError(f"lun {name!r}: {size_bytes} bytes is not a multiple of the {rec.block_size}-byte "
                             "block size")
        live = self.luns[rec.name]
        if not rec.thin and isinstance(live.device, FileBackend):
            _check_space(self.catalog.lun_path(rec), size_bytes - rec.size_bytes)
        # Through the device the LU serves (the copy-on-write volume, or a restore's), never the backend under it:
        # the volume keeps the LUN's geometry and a restore's bitmap grows with it.
        await live.lu.device.resize(size_bytes // rec.block_size)
        try:
            rec = self.catalog.resize_lun(name, size_bytes)
        except BaseException:
            await live.lu.device.resize(rec.num_blocks)
            raise
        live.lu.notify_capacity_changed()
        log.info("lun %s grown to %s", rec.name, format_size(rec.size_bytes))
        return rec

    async def map_lun(self, iqn: str, name: str, lun: int | None = None) -> LunMapping:
        m = self.catalog.map_lun(iqn, name, lun)
        if m.name not in self.luns:  # a worker's: an unmapped LUN another worker held comes here with its mapping
            await self.open_lun(m.name)
        self.build_target(iqn)
        log.info("lun %s mapped on %s as LUN %d", m.name, iqn, m.lun)
        return m

    async def unmap_lun(self, iqn: str, name: str) -> LunMapping:
        mapping = next((m for m in self.catalog.list_mappings(iqn) if m.name == name), None)
        if mapping is None:
            self.catalog.get_lun(name)  # NotFound for an unknown LUN, before the more specific message below
            raise NotFound(f"lun {name!r} is not mapped on {iqn}")
        with self.catalog.transaction():
            m = self.catalog.unmap_lun(iqn, mapping.lun)
            if self.owned_targets is not None:
                # Under serve --workers an unmap moves the LUN, and the LUNs made from its snapshots, to another
                # worker when it was their home target; one a restore writes stays (the rollback keeps the mapping).
                self._refuse_if_restoring([n for n in self.luns if not self.serves_lun(n)],
                                          f"moved to another worker process by unmapping {name} from {iqn}")
        self.build_target(iqn)
        log.info("lun %s unmapped from %s (was LUN %d)", m.name, iqn, m.lun)
        return m

    async def add_acl(self, iqn: str, initiator: str) -> str:
        stored: str = self.catalog.add_acl(iqn, initiator)
        self.build_target(iqn)
        # The first entry turns an open target into a closed one: sessions of initiators not listed must go.
        t = self.catalog.get_target(iqn)
        self._logout(lambda r: r.target is not None and r.target.name == t.iqn
                     and r.initiator_name.lower() not in t.acl)
        log.info("acl %s: allowed %s", t.iqn, stored)
        return stored

    async def remove_acl(self, iqn: str, initiator: str) -> None:
        self.catalog.remove_acl(iqn, initiator)
        self.build_target(iqn)
        t = self.catalog.get_target(iqn)
        if t.acl:  # an emptied ACL opens the target; nobody needs to go
            self._logout(lambda r: r.target is not None and r.target.name == t.iqn
                         and r.initiator_name.lower() not in t.acl)
        log.info("acl %s: removed %s", t.iqn, initiator.lower())

    async def set_chap(self, iqn: str, chap: ChapConfig) -> None:
        self.catalog.set_chap(iqn, chap)
        self.build_target(iqn)
        log.info("chap %s: set for user %s%s (applies to new logins)", iqn, chap.user, ", mutual" if chap.mutual else "")

    async def clear_chap(self, iqn: str) -> None:
        self.catalog.clear_chap(iqn)
        self.build_target(iqn)
        log.info("chap %s: cleared", iqn)

    def _refuse_if_restoring(self, names: list[str], what: str) -> None:
        """A LUN an unfinished restore writes into keeps its backing store: the copier and the destination's
        initiators would meet it closed half-way."""
        for name in names:
            rs = self.recovery.restoring(name) if self.recovery is not None else None
            if rs is not None:
                raise InUse(f"lun {name!r} is being restored by recovery {rs.id} ({rs.state.value}) and cannot be "
                            f"{what}; cancel it or let it finish first")

    @by_name(lambda self, config, **_: [*(r.name for r in self.catalog.list_luns()), *(c.name for c in config.luns)])
    async def apply(self, config: Config, *, dry_run: bool = False) -> Plan:
        """Make the catalog equal to ``config`` (one transaction), then the live array equal to the catalog."""
        before = {rec.name: rec for rec in self.catalog.list_luns()}
        wanted = {lun.name: lun for lun in config.luns}
        self._refuse_if_restoring([n for n in before if n not in wanted], "removed")
        # A change of these flags reopens the backing store (reconcile).
        self._refuse_if_restoring([n for n, w in wanted.items() if n in before
                                   and (w.read_only, w.thin) != (before[n].read_only, before[n].thin)], "reopened")
        for name, lun in wanted.items():
            if name not in before and lun.backend != "rbd":  # an image on the cluster is no path here
                self.check_backing_path(name, lun.path)
        plan = self.catalog.apply(config, dry_run=dry_run)
        if not dry_run and plan:
            for step in plan.steps:
                log.info("apply: %s", step)
            # LUNs opened from now on reach the cluster the configuration names; open ones keep their connection.
            self.ceph = self.catalog.get_ceph()
            await self.reconcile(before)
        return plan

    async def reconcile(self, before: dict[str, LunRecord] | None = None) -> None:
        """Bring the live objects in line with the catalog after a bulk change: open new LUNs, grow, reopen those
        whose flags changed, rebuild every target, then close what the catalog no longer has. A removed LUN's file
        inside the data dir is removed as ``lun delete`` would, unless a remaining LUN took over its path (a
        rename)."""
        records = {rec.name: rec for rec in self.catalog.list_luns() if self.serves_lun(rec.name)}
        for name, rec in records.items():
            live = self.luns.get(name)
            if live is None:
                await self.open_lun(name)
                continue
            dev = live.device
            if dev.read_only != rec.read_only or dev.thin != rec.thin:
                if self.snapshots is not None:
                    await self.snapshots.stop_flatten(name)  # it runs on the device about to close
                live.device = await asyncio.to_thread(open_store, rec.backend, self._store(rec))
                live.lu.device = self._cow(rec, live.device)
                await dev.close()
                if self.snapshots is not None:
                    self.snapshots.resume_flatten(name)  # on the device opened anew
            if live.device.num_blocks < rec.num_blocks:
                await live.lu.device.resize(rec.num_blocks)
                live.lu.notify_capacity_changed()
        wanted = {t.iqn for t in self.catalog.list_targets() if self.serves_target(t.iqn)}
        for iqn in wanted:
            self.build_target(iqn)
        gone = {entry.name for entry in self.directory.targets.values()} - wanted
        for iqn in gone:
            self.directory.remove(iqn)
        if gone:
            self._logout(lambda r: r.target is not None and r.target.name in gone)
        every = {rec.name: rec for rec in self.catalog.list_luns()}
        in_use = {self.catalog.lun_path(rec) for rec in every.values()}
        for name in [n for n in self.luns if n not in records]:
            live = self.luns.pop(name)
            await self.release_lun(live)
            if name in every:
                log.info("lun %s: another worker serves it now", name)
                continue
            old = (before or {}).get(name)
            if old is not None and old.backend == "rbd" and self.gateways is not None:
                # As lun delete does: a tombstone, so that the other gateways stop serving it too.
                await self.gateways.unshare(name, unpublish=True, naa=old.naa)
            if old is not None:
                path = self.catalog.lun_path(old)
                if path not in in_use and removable(old, path):
                    os.unlink(path)
            log.info("lun %s removed", name)

    async def release_lun(self, live: LiveLun) -> None:
        """Close a LUN this process stops serving (removed, or another worker of ``serve --workers`` takes it): its
        copy-on-write volume's pool files go with it, so the next owner opens them afresh."""
        if self.snapshots is not None:
            await self.snapshots.stop_flatten(live.name)
        vol = self.snapshots.volumes.pop(live.name, None) if self.snapshots is not None else None
        if self.gateways is not None:
            await self.gateways.unshare(live.name, unpublish=False)  # its lease, for the worker that takes it next
        await live.device.close()
        if vol is not None:
            vol.close_pool()

    async def close(self) -> None:
        for task in list(self._reopening):
            task.cancel()
        if self.gateways is not None:
            await self.gateways.close()  # releases the leases: the other gateways own the LUNs at once
        if self.snapshots is not None:
            await self.snapshots.close()
        for live in self.luns.values():
            try:
                await live.device.close()
            except Exception:
                log.exception("closing LUN %s", live.name)


REOPEN_S = 10.0  # how often a LUN whose store could not be opened at start is tried again


def _check_space(path: str, needed: int) -> None:
    """Refuse a thick allocation the filesystem cannot hold, before making it: posix_fallocate would otherwise fill
    the disk under every other LUN and only then fail."""
    directory = os.path.dirname(path)
    while directory and not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    st = os.statvfs(directory or ".")
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise OutOfSpace(f"a thick allocation of {format_size(needed)} does not fit in {directory}: "
                         f"{free} bytes free")


def ensure_demo(catalog: Catalog, size_bytes: int) -> None:
    """Create the demo target and its LUN 0 when missing; leave them alone when present."""
    names = {lun.name for lun in catalog.list_luns()}
    if DEMO_LUN not in names:
        catalog.create_lun(DEMO_LUN, size_bytes=size_bytes, block_size=512, thin=True)
    if DEMO_IQN not in {t.iqn for t in catalog.list_targets()}:
        catalog.create_target(DEMO_IQN, alias="demo")
    if not any(m.name == DEMO_LUN for m in catalog.list_mappings(DEMO_IQN)):
        catalog.map_lun(DEMO_IQN, DEMO_LUN, 0)


def with_demo(cfg: Config, catalog: Catalog, size_bytes: int) -> Config:
    """``cfg`` plus the demo LUN and target, so that applying a config with ``--demo`` keeps them (and the demo
    LUN's identity) instead of removing them as undeclared and re-creating them with a new NAA."""
    luns = list(cfg.luns)
    if all(lun.name != DEMO_LUN for lun in luns):
        try:
            luns.append(catalog.get_lun(DEMO_LUN).config())
        except NotFound:
            luns.append(LunConfig(DEMO_LUN, size_bytes))
    targets = list(cfg.targets)
    if all(t.iqn != DEMO_IQN for t in targets):
        targets.append(TargetConfig(DEMO_IQN, alias="demo", luns=(LunMapping(0, DEMO_LUN),)))
    return dataclasses.replace(cfg, luns=tuple(luns), targets=tuple(targets))


def attach_text(host: str, port: int, iqn: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return "\n".join([
        f"  iSCSI URL : iscsi://{shown}:{port}/{iqn}/0",
        "  Linux     : iscsiadm -m discovery -t sendtargets -p " + f"{shown}:{port}",
        f"              iscsiadm -m node -T {iqn} -p {shown}:{port} --login",
        f"  Windows   : New-IscsiTargetPortal -TargetPortalAddress {host} -TargetPortalPortNumber {port}",
        f"              Connect-IscsiTarget -NodeAddress {iqn} -IsPersistent $true",
        f"              (or: iscsicli QAddTargetPortal {host} {port}  then  iscsicli QLoginTarget {iqn})",
    ])


@dataclass
class ServeOptions:
    data_dir: str = "./lunsync-data"
    listen: list[str] = field(default_factory=list)
    config: str | None = None
    demo: bool = False
    demo_size: int = 1 << 30
    api: str = DEFAULT_API  # HOST:PORT, [V6]:PORT, unix:PATH, or "off"
    metrics: str = DEFAULT_METRICS  # HOST:PORT or "off"
    api_tls_cert: str | None = None
    api_tls_key: str | None = None
    api_max_body_bytes: int = 1 << 20
    log_level: str = "info"  # debug, info, warning, error
    log_format: str = "text"  # text, or json: one object per line
    hooks: str | None = None  # the hook file: named restore hooks, the only commands a restore can run
    gateway: GatewaySettings | None = None  # one of several gateways of the rbd LUNs (serve --gateway)
    write_staging_bytes: int = DEFAULT_STAGING_BYTES  # per LUN; see CowVolume.write
    # serve --workers N: a control process and N worker processes (lunsync.provider.control); 0: one per core this
    # process may run on; None, 1, or 0 on a single core: one process
    workers: int | None = None


def worker_count(workers: int | None) -> int:
    """How many worker processes ``serve --workers`` asks for, 1 meaning one process: 0 is the cores this process may
    run on (its CPU affinity, which taskset, a cpuset and systemd's CPUAffinity narrow, not the machine's count)."""
    if workers is None:
        return 1
    if workers == 0:
        return len(os.sched_getaffinity(0))
    if workers < 0:
        raise ValueError(f"--workers takes a number of processes, at least 1 (0: one per core), not {workers}")
    return workers


def array_registry(array: Array, server: Server, counters: ApiCounters) -> CollectorRegistry:
    """The metrics registry of one process serving LUNs: the portal's and API's counts, each live LUN, the
    snapshots and the restores in progress."""
    from lunsync.provider.metrics import LunInfo, SnapshotCollector, build_registry
    from lunsync.provider.resync_array import register_metrics

    def luns() -> list[LunInfo]:
        return [LunInfo(n, live.device.num_blocks * live.device.block_size,
                         bool(getattr(live.device, "flush_failed", False)),
                         None if live.lu.alua is None else live.lu.alua.owner == array.port_group)
                for n, live in array.luns.items()]

    registry = build_registry(server, counters, luns)
    registry.register(SnapshotCollector(lambda: array.snapshots))
    register_metrics(registry, array)  # restores (recovery sets) in progress
    return registry


async def _start_http(array: Array, server: Server, opts: ServeOptions) -> tuple[list[Any], str, str | None]:
    """Start the API and the metrics endpoint on this loop. A port that cannot be bound is logged and skipped: the
    LUNs are served regardless, because initiators matter more than the management plane."""
    from lunsync.provider.api import READ_ONLY_TOKEN_FILENAME, ApiContext, HttpServer, asgi_app, ensure_token
    from lunsync.provider.metrics import ApiCounters, metrics_app

    if (opts.api_tls_cert is None) != (opts.api_tls_key is None):
        raise ValueError("--api-tls-cert and --api-tls-key go together")
    counters = ApiCounters()
    ctx = ApiContext(array, server, ensure_token(array.data_dir), counters, max_body_bytes=opts.api_max_body_bytes,
                     read_token=ensure_token(array.data_dir, READ_ONLY_TOKEN_FILENAME))
    running: list[object] = []
    status_api, status_metrics = "off", None
    if opts.api != "off":
        try:
            api = await HttpServer.start("API", asgi_app(ctx), opts.api, 8080, certfile=opts.api_tls_cert,
                                         keyfile=opts.api_tls_key)
            running.append(api)
            ctx.api_address = status_api = api.address
        except OSError as e:
            log.error("API: cannot listen on %s: %s; continuing without the API", opts.api, e)
            status_api = f"unavailable ({e.strerror or e})"
    if opts.metrics != "off":
        try:
            if opts.metrics.startswith("unix:"):
                raise ValueError("--metrics takes HOST:PORT (Prometheus scrapes over TCP)")
            m = await HttpServer.start("metrics", metrics_app(array_registry(array, server, counters)), opts.metrics,
                                       METRICS_PORT)
            running.append(m)
            ctx.metrics_address = status_metrics = m.address + "/metrics"
        except OSError as e:
            log.error("metrics: cannot listen on %s: %s; continuing without metrics", opts.metrics, e)
    return running, status_api, status_metrics


def _stop_on(sig: signal.Signals, stop: asyncio.Event) -> None:
    # Say which signal: an unexpected stop is otherwise indistinguishable from a requested one in the log.
    log.info("received %s", sig.name)
    stop.set()


@dataclass
class Prepared:
    """What both ways of serving start from: the catalog (locked, configured), the portal settings and addresses."""

    data_dir: str
    catalog: Catalog
    settings: PortalSettings
    listen: list[str]
    advertise: list[str]
    hooks: dict[str, Any]


def prepare(opts: ServeOptions) -> Prepared:
    data_dir = os.path.abspath(opts.data_dir)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    from lunsync.provider.config import load_hooks

    hooks = load_hooks(opts.hooks) if opts.hooks else {}
    if hooks:
        log.info("restore hooks: %s", ", ".join(sorted(hooks)))
    # exclusive: a second daemon on the same data dir would write the same LUN files behind this one's back.
    catalog = Catalog.open(data_dir, exclusive=True)
    settings = PortalSettings()
    listen = list(opts.listen)
    if opts.config:
        from lunsync.provider.config import load_config

        cfg = load_config(opts.config)
        if opts.demo:
            cfg = with_demo(cfg, catalog, opts.demo_size)
        plan = catalog.apply(cfg)
        for step in plan.steps:
            log.info("config: %s", step)
    # The portal section lives in the catalog (apply and --config write it), so it survives restarts.
    p = catalog.get_portal()
    settings.nop_interval_s = p.nop_interval_s
    settings.nop_timeout_s = p.nop_timeout_s
    settings.login_timeout_s = p.login_timeout_s
    settings.max_sessions = p.max_sessions
    if not listen:
        listen = list(p.listen)
    if opts.demo:
        ensure_demo(catalog, opts.demo_size)
    if not listen:
        listen = [DEFAULT_LISTEN]
    return Prepared(data_dir, catalog, settings, listen, list(p.advertise), dict(hooks))


async def listen_portals(server: Server, directory: Directory, prep: Prepared) -> list[tuple[str, int]]:
    """Open every iSCSI portal and record it (and the advertised addresses) for discovery."""
    bound: list[tuple[str, int]] = []
    tpgt = prep.settings.tpgt
    for spec in prep.listen:
        host, port = parse_hostport(spec)
        _, p_ = await server.listen(host, port)
        bound.append((host, p_))
        directory.portals.append(PortalAddress(host, p_, tpgt))
        log.info("iSCSI portal listening on %s:%d (data path: %s)", host, p_, native.describe())
    for spec in prep.advertise:
        host, _, port_text = spec.rpartition(":")
        directory.advertise.append(PortalAddress(host.strip("[]"), int(port_text), tpgt))
    if prep.advertise:
        log.info("discovery advertises %s", ", ".join(prep.advertise))
    return bound


def print_banner(opts: ServeOptions, prep: Prepared, bound: list[tuple[str, int]], targets: int, api_at: str,
                 metrics_at: str | None) -> None:
    if opts.demo:
        host, port = bound[0]
        print(f"lunsync: serving {DEMO_IQN} (data dir {prep.data_dir})", flush=True)
        print(attach_text(host, port, DEMO_IQN), flush=True)
    else:
        print(f"lunsync: serving {targets} target(s) on " + ", ".join(f"{h}:{p}" for h, p in bound), flush=True)
    print(f"  API       : {api_at} (token in {os.path.join(prep.data_dir, 'api-token')})", flush=True)
    print(f"  metrics   : {metrics_at or 'off'}", flush=True)


def stop_event() -> asyncio.Event:
    """Set on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop_on, sig, stop)
    return stop


async def serve(opts: ServeOptions, ready: asyncio.Event | None = None) -> int:
    count = worker_count(opts.workers)
    if count > 1:
        from lunsync.provider.control import serve_workers

        return await serve_workers(opts, prepare(opts), count, ready)
    prep = prepare(opts)
    catalog, settings, hooks = prep.catalog, prep.settings, prep.hooks
    array = Array(prep.data_dir, catalog, ceph=catalog.get_ceph(), write_staging_bytes=opts.write_staging_bytes)
    if opts.gateway is not None:
        array.port_group = settings.tpgt = opts.gateway.port_group
    await array.load()
    if opts.gateway is not None:
        from lunsync.provider import shared_luns

        await shared_luns.attach(array, opts.gateway)  # before any initiator: PR state and ALUA come from the cluster
    server = Server(array.directory, settings)
    array.server = server
    from lunsync.provider import resync_array

    await resync_array.attach(array, hooks)  # resumes the resyncs a stop or a crash interrupted, before any initiator is in
    # The management plane first: once the iSCSI port accepts, the API answers too (tests and scripts rely on it).
    http, api_at, metrics_at = await _start_http(array, server, opts)
    bound = await listen_portals(server, array.directory, prep)
    print_banner(opts, prep, bound, len(array.directory.targets), api_at, metrics_at)
    stop = stop_event()
    if ready is not None:
        ready.set()
    systemd.ready(f"serving {len(array.luns)} LUN(s) on {len(bound)} portal(s); API {api_at}")
    await stop.wait()
    systemd.stopping()
    log.info("shutting down: draining in-flight commands")
    for h in http:
        await h.stop()
    await server.stop()
    await resync_array.detach(array)  # copiers pause and commit; the next start resumes them
    await array.close()
    catalog.close()
    log.info("stopped")
    return 0


def keep_io_buffers_on_the_heap() -> bool:
    """Stop glibc from serving 128 KiB+ allocations with a fresh mmap each time.

    Every READ allocates its Data-In buffer; at glibc's default threshold (128 KiB, just below a 128 KiB read plus
    Python's header) each one was an mmap, a page fault per 4 KiB on first touch and an munmap on release: 40 % of
    the daemon's time at 128 KiB reads. A fixed threshold well above the largest transfer keeps them in the heap.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


SWITCH_INTERVAL_S = 0.0005


def run(opts: ServeOptions) -> int:
    from lunsync.provider import logs

    logs.configure(opts.log_level, opts.log_format)
    keep_io_buffers_on_the_heap()
    # The event loop holds the GIL while initiators keep it busy; a thread that finished its fdatasync, copy or
    # catalog statement then waits for the interpreter's switch interval (5 ms by default) before it may go on, once
    # per step. With 0.5 ms a snapshot set's catalog commit was durable 3.7-24 ms after the request instead of 40-72 ms
    # under 8 busy LUNs (tests/snapshots/bench_cow.py set). The loop alone never waits on it: with no other thread
    # asking for the GIL the interval costs nothing.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    runner: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the daemon still runs without it
        runner = asyncio.run
    return runner(serve(opts))

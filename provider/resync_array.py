"""The daemon's side of the provider: the live :class:`~lunsync.provider.daemon.Array` as a VSS
:class:`~lunsync.provider.vss.Engine`, and the wiring of recovery sets into the daemon.

This module owns :class:`ArrayEngine` (LUNs and snapshots by name, the device swap on a LUN's LogicalUnit, growing a
destination with CAPACITY DATA HAS CHANGED, LUN masking on every target that shows the LUN, swapping identities),
:func:`attach`, which the daemon calls after loading the array to build the :class:`RecoveryManager` and
:class:`HardwareProvider` and resume interrupted resyncs, and :class:`ResyncCollector`, the Prometheus families of
restores. The SCSI layer only ever sees the BlockDevice protocol: a LUN under resync is a LogicalUnit whose ``device``
is a :class:`~lunsync.snapshots.resync.ResyncVolume` until the copy ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lunsync.provider.config import HookConfig
from lunsync.provider.recovery_store import CatalogRecoveryStore
from lunsync.provider.vss import (
    HardwareProvider,
    LunRef,
    RecoveryManager,
    RecoverySet,
    SnapshotRef,
    VssCode,
    VssError,
)
from lunsync.snapshots.catalog import Invalid, LunRecord, NotFound
from lunsync.snapshots.device import AllocatedRegions, BlockDevice, ChangedRegions
from lunsync.snapshots.model import LunIdentity, split_rbd_spec
from lunsync.snapshots.rbd import create_image, remove_image
from lunsync.target.scsi import sense as S
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lunsync.provider.daemon import Array
    from lunsync.provider.snapshot_service import SnapshotService
    from lunsync.snapshots.snapcat import SnapshotRecord

log = logging.getLogger("lunsync.recovery")

INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)  # SPC-4 Annex D; the sense table does not list it yet



def _lun_ref(rec: LunRecord) -> LunRef:
    return LunRef(rec.name, rec.size_bytes, rec.block_size, rec.naa, rec.serial, rec.chunk_size_bytes)


def _snap_ref(rec: SnapshotRecord) -> SnapshotRef:
    return SnapshotRef(rec.lun_name, rec.name, rec.size_bytes, rec.block_size, rec.chunk_size_bytes, rec.naa,
                       rec.serial, rec.id)


class ArrayEngine:
    """The live array, as the VSS provider needs it."""

    def __init__(self, array: Array) -> None:
        self.array = array
        self.data_dir = array.data_dir
        self._own: dict[str, BlockDevice] = {}  # the LUN's device while a ResyncVolume stands in for it

    @property
    def snaps(self) -> SnapshotService:
        svc = self.array.snapshots
        if svc is None:
            raise NotFound("snapshots are not available")
        return svc

    # -- names --

    def lun(self, name: str) -> LunRef:
        return _lun_ref(self.array.catalog.get_lun(name))

    def luns(self) -> Sequence[LunRef]:
        return [_lun_ref(r) for r in self.array.catalog.list_luns()]

    def _snap_rec(self, ref: str) -> SnapshotRecord:
        from lunsync.snapshots.snapcat import parse_snapshot_name

        try:
            lun, name = parse_snapshot_name(ref)
        except ValueError as e:
            raise NotFound(str(e)) from None
        return self.snaps.cat.get_snapshot(lun, name)

    def snapshot(self, ref: str) -> SnapshotRef:
        rec = self._snap_rec(ref)
        if rec.state != "valid":
            raise NotFound(f"snapshot {rec.full_name} is invalid ({rec.invalid_reason})")
        return _snap_ref(rec)

    def snapshots(self) -> Sequence[SnapshotRef]:
        return [_snap_ref(r) for r in self.snaps.cat.list_snapshots() if r.state == "valid"]

    def _remote(self, rec: SnapshotRecord) -> bool:
        """True for a snapshot whose LUN another worker serves: read through it, never opened here."""
        return self.array.remote_call is not None and not self.array.serves_lun(rec.lun_name)

    async def snapshot_view(self, snap: SnapshotRef) -> BlockDevice:
        from lunsync.provider.remote_snapshot import remote_view

        rec = self._snap_rec(snap.ref)
        remote = remote_view(self.array, rec)
        return remote if remote is not None else await self.snaps.open_view_async(rec)

    async def changed_chunks(self, snap: SnapshotRef) -> set[int] | None:
        rec = self._snap_rec(snap.ref)
        if self._remote(rec):
            return None  # another worker's map: every region is copied
        if rec.kind == "rbd":  # the store diffs its snapshot against its head itself, over the network: a thread
            view = await self.snaps.open_view_async(rec)
            if not isinstance(view, ChangedRegions):
                return None
            return await asyncio.to_thread(view.changed_regions, snap.chunk_size_bytes)
        vol = self.snaps.volumes.get(rec.lun_name)
        if vol is None or rec.lun_id is None or vol.lun_id != rec.lun_id or not rec.needs_cow:
            return None  # a filled clone no longer tracks its origin's changes
        try:
            view = self.snaps.open_view(rec)
        except (NotFound, Invalid):
            return None
        if not isinstance(view, ChangedRegions):
            return None
        return view.changed_regions(snap.chunk_size_bytes)

    async def allocated_chunks(self, snap: SnapshotRef) -> set[int] | None:
        rec = self._snap_rec(snap.ref)
        if rec.kind != "rbd" or self._remote(rec):
            return None  # lunsync's own snapshots, and another worker's: every chunk is copied
        view = await self.snaps.open_view_async(rec)
        if not isinstance(view, AllocatedRegions):
            return None
        return await view.allocated_regions(snap.chunk_size_bytes)

    # -- the device swap --

    def destination_device(self, name: str) -> BlockDevice:
        own = self._own.get(name)
        if own is not None:
            return own
        return self.array.luns[name].lu.device

    def install(self, name: str, device: BlockDevice | None) -> None:
        live = self.array.luns[name]
        if device is None:
            own = self._own.pop(name, None)
            if own is not None:
                live.lu.device = own
            return
        self._own.setdefault(name, live.lu.device)
        live.lu.device = device

    # -- LUN management --

    async def create_lun(self, name: str, size_bytes: int, block_size: int, *, like: SnapshotRef | None = None,
                         pool: str | None = None) -> LunRef:
        """A restore's new destination. From an RBD snapshot it is a new RBD LUN, image ``name`` in ``pool`` (default
        the origin's pool), refused if that image exists; from any other snapshot a file LUN."""
        rec = self._snap_rec(like.ref) if like is not None else None
        if rec is None or rec.kind != "rbd":
            if pool is not None:
                raise Invalid(f"pool {pool!r}: only a restore from an RBD snapshot makes a new image in a pool; "
                              f"{like.ref if like is not None else name} is not one")
            return _lun_ref(await self.array.create_lun(name, size_bytes, block_size=block_size))
        spec = f"{pool or split_rbd_spec(self.array.catalog.get_lun(rec.lun_name).path)[0]}/{name}"
        await asyncio.to_thread(create_image, self.array.ceph, spec, size_bytes)
        try:
            made = await self.array.create_lun(name, size_bytes, path=spec, backend="rbd", block_size=block_size)
        except BaseException:
            await asyncio.to_thread(remove_image, self.array.ceph, spec)
            raise
        log.info("lun %s created on the new rbd image %s for a restore from %s", name, spec, rec.full_name)
        return _lun_ref(made)

    async def grow_lun(self, name: str, size_bytes: int) -> LunRef:
        rec = self.array.catalog.get_lun(name)
        grown = -(-size_bytes // rec.block_size) * rec.block_size
        return _lun_ref(await self.array.resize_lun(name, grown))  # tells the sessions CAPACITY DATA HAS CHANGED

    def _scsi_targets_of(self, name: str) -> Iterator[Any]:
        lu = self.array.luns[name].lu
        for entry in self.array.directory.targets.values():
            if any(x is lu for x in entry.scsi.luns.values()):
                yield entry.scsi

    def mask(self, name: str, allowed: frozenset[str] | None) -> None:
        lu = self.array.luns[name].lu
        for scsi in self._scsi_targets_of(name):
            masks = getattr(scsi, "masked", None)
            if masks is None:
                continue
            if allowed is None:
                masks.pop(lu, None)
            else:
                masks[lu] = allowed
        lu.add_ua_all(S.REPORTED_LUNS_DATA_HAS_CHANGED)
        log.info("lun %s %s", name, "unmasked" if allowed is None else
                 f"masked from every initiator but {', '.join(sorted(allowed)) or 'none'}")

    def free_bytes(self, name: str) -> int | None:
        try:
            path = self.array.catalog.lun_path(self.array.catalog.get_lun(name))
        except NotFound:
            path = os.path.join(self.data_dir, "luns", "x")
        directory = os.path.dirname(path)
        while directory and not os.path.isdir(directory):
            directory = os.path.dirname(directory)
        try:
            st = os.statvfs(directory or ".")
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def baseline_latency_s(self, name: str) -> float | None:
        """Median read/write service time of the LUN so far: what initiators saw before the resync. The median, not
        the mean: one command that waited out a stalled disk would otherwise raise the baseline so far that the
        throttle never backs off."""
        server = self.array.server
        if server is None:
            return None
        from lunsync.target.stats import Op

        return server.stats.lun(name).median_s((int(Op.READ), int(Op.WRITE)))

    # -- snapshots --

    async def _ask_control(self, method: str, params: dict[str, Any]) -> Any:
        call = self.array.remote_call
        assert call is not None
        from lunsync.provider.channel import ChannelClosed, RemoteError

        try:
            return await call(method, params)
        except (ChannelClosed, RemoteError) as e:
            code = VssCode.OBJECT_NOT_FOUND if getattr(e, "status", 0) == 404 else VssCode.PROVIDER_VETO
            raise VssError(code, str(e)) from None

    async def create_snapshots(self, luns: Sequence[str], set_name: str) -> list[SnapshotRef]:
        if self.array.remote_call is not None and not all(self.array.serves_lun(n) for n in luns):
            # LUNs of several workers: one point in time by the control's two-phase hold, as POST /v1/snapshots.
            names = [f"{n}@{set_name}" for n in luns]
            await self._ask_control("snapshot-set", {"snapshots": names, "set": set_name})
            return [_snap_ref(self._snap_rec(n)) for n in names]
        recs, _ = await self.snaps.create([(lun, set_name) for lun in luns], set_name=set_name)
        return [_snap_ref(r) for r in recs]

    async def delete_snapshot(self, ref: str) -> None:
        rec = self._snap_rec(ref)
        if self.array.remote_call is not None and not self.array.serves_lun(rec.lun_name):
            await self._ask_control("snapshot-delete", {"snapshot": rec.full_name})  # its LUN's worker deletes it
            return
        await self.snaps.delete(rec.lun_name, rec.name)

    async def expose_snapshot(self, ref: str) -> dict[str, Any]:
        rec = self._snap_rec(ref)
        if rec.exposed_target is None:
            maps = self.array.catalog.lun_mappings(rec.lun_name)
            targets = [iqn for iqn, _ in maps] or [t.iqn for t in self.array.catalog.list_targets()]
            if not targets:
                raise NotFound(f"no target to expose {ref} on")
            rec = await self.snaps.expose(rec.lun_name, rec.name, targets[0])
        return {"target": rec.exposed_target, "lun": rec.exposed_lun}

    async def unexpose_snapshot(self, ref: str) -> None:
        rec = self._snap_rec(ref)
        if rec.exposed_target is not None:
            await self.snaps.unexpose(rec.lun_name, rec.name)

    async def swap_identity(self, ref: str) -> None:
        rec = self._snap_rec(ref)
        lun = self.array.catalog.get_lun(rec.lun_name)
        self.snaps.cat.swap_identity(lun.name, rec.id)
        live = self.array.luns[lun.name].lu
        live.identity = LunIdentity(naa=bytes.fromhex(rec.naa), serial=rec.serial)
        live.add_ua_all(INQUIRY_DATA_HAS_CHANGED)
        exp = self.snaps.exposures.get(rec.id)
        if exp is not None:
            exp.lu.identity = LunIdentity(naa=bytes.fromhex(lun.naa), serial=lun.serial)
            exp.lu.add_ua_all(INQUIRY_DATA_HAS_CHANGED)
        log.info("lun %s now has the identity of %s (serial %s)", lun.name, rec.full_name, rec.serial)


class ResyncCollector(Collector):
    """Prometheus families of restores, read at scrape time from the running copiers and the recovery sets."""

    def __init__(self, manager: RecoveryManager, array: Array) -> None:
        self.manager = manager
        self.array = array

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("lunsync_recovery_state", "1 for the state each recovery set is in.",
                                   labels=["recovery", "state"])
        from lunsync.provider.vss import RecoveryState

        recent = self.manager.list_sets()[-20:]  # bounded: the newest sets only
        for rs in recent:
            for st in RecoveryState:
                states.add_metric([rs.id, st.value], 1.0 if rs.state is st else 0.0)
        yield states
        total = GaugeMetricFamily("lunsync_recovery_size_bytes", "Bytes a restore of one LUN has to bring over.",
                                  labels=["recovery", "lun"])
        copied = CounterMetricFamily("lunsync_recovery_bytes_copied", "Bytes the copier has moved to the destination.",
                                     labels=["recovery", "lun"])
        done = GaugeMetricFamily("lunsync_recovery_bytes_done",
                                 "Bytes of the destination that hold the snapshot's data (copied, overwritten or "
                                 "unmapped).", labels=["recovery", "lun"])
        rate = GaugeMetricFamily("lunsync_recovery_copy_rate_bytes_per_second",
                                 "Bytes done per second of wall-clock time over the last seconds (throttle included); "
                                 "what recovery show reports.", labels=["recovery", "lun"])
        eta = GaugeMetricFamily("lunsync_recovery_eta_seconds",
                                "Seconds until the restore of one LUN is done at that rate (absent until measured).",
                                labels=["recovery", "lun"])
        redirected = CounterMetricFamily("lunsync_recovery_redirected_reads",
                                         "Reads served from the snapshot because their region was not copied yet.",
                                         labels=["recovery", "lun"])
        fg = GaugeMetricFamily("lunsync_recovery_foreground_latency_seconds",
                               "Smoothed service time of initiators' I/O on a LUN under resync.", labels=["lun"])
        fg_base = GaugeMetricFamily("lunsync_recovery_baseline_latency_seconds",
                                    "The foreground latency the adaptive throttle protects.", labels=["lun"])
        live = {(sid, dest): prog for sid, dest, prog in self.manager.live_progress()}
        for rs in recent:
            for p in rs.pairs:
                prog = live.get((rs.id, p.destination))
                labels = [rs.id, p.destination]
                total.add_metric(labels, prog.bytes_total if prog else p.bytes_total)
                copied.add_metric(labels, prog.bytes_copied if prog else p.bytes_copied)
                done.add_metric(labels, prog.bytes_done if prog else p.bytes_done)
                rate.add_metric(labels, prog.rate_bps if prog else 0.0)
                if prog is not None and prog.eta_s is not None:
                    eta.add_metric(labels, prog.eta_s)
                redirected.add_metric(labels, prog.redirected_reads if prog else p.redirected_reads)
                if prog is not None and prog.foreground_latency_s is not None:
                    fg.add_metric([p.destination], prog.foreground_latency_s)
                    base = prog.throttle.get("baseline_latency_s")
                    if base is not None:
                        fg_base.add_metric([p.destination], base)
        yield from (total, copied, done, rate, eta, redirected, fg, fg_base)


async def attach(array: Array, hooks: Mapping[str, HookConfig] | None = None
                 ) -> tuple[RecoveryManager, HardwareProvider]:
    """Build the provider on a loaded array, resume the resyncs a stop or crash interrupted, and hang both on the
    array (``array.recovery``, ``array.provider``) for the API. ``hooks`` are the server's named restore hooks."""
    engine = ArrayEngine(array)
    def serves(rs: RecoverySet) -> bool:
        return all(array.serves_lun(p.destination) for p in rs.pairs) if rs.pairs else array.holds_unmapped

    store = CatalogRecoveryStore(array.catalog, serves if array.owned_targets is not None else None)
    manager = RecoveryManager(engine, store, hooks=hooks)
    provider = HardwareProvider(engine, manager)
    array.recovery = manager
    array.provider = provider
    await manager.load()
    return manager, provider


def register_metrics(registry: Any, array: Array) -> None:
    """Add the restore families to the daemon's metrics registry (no-op before :func:`attach`)."""
    manager = getattr(array, "recovery", None)
    if manager is not None:
        registry.register(ResyncCollector(manager, array))


async def detach(array: Array) -> None:
    """At shutdown, after the portals stop: pause every copier and commit (the sets resume at the next start)."""
    manager = getattr(array, "recovery", None)
    if manager is not None:
        await manager.shutdown()

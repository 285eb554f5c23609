"""The live side of snapshots in the daemon: copy-on-write volumes, snapshot sets, exposures, clone fills and pools.

This module owns :class:`SnapshotService`, which the :class:`~lunsync.provider.daemon.Array` holds. It wraps every
LUN's backend in a :class:`~lunsync.snapshots.cow.CowVolume` when the LUN is opened, takes snapshots and snapshot sets
(hold new writes on every member, drain in-flight ones, commit all epochs in one catalog transaction, release; bounded
by ``hold_timeout_s``, after which the set is abandoned with nothing recorded), deletes them (copies are freed only
when no remaining snapshot maps to them), exposes a snapshot as a read-only LUN with its own identity on any target,
fills clones in the background with ``os.copy_file_range`` until they no longer depend on their origin, and opens the
pools. As everywhere in the daemon, the catalog transaction comes first and the live objects follow, so a crash in
between is rolled forward by :meth:`load`. It keeps plain counters for the metrics collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar, cast

from lunsync.provider.gateway import PeersNotHeld, new_hold_id
from lunsync.snapshots.backend import FileBackend
from lunsync.snapshots.backup import BackupManifest
from lunsync.snapshots.catalog import CatalogError, InUse, Invalid, LunRecord, NotFound
from lunsync.snapshots.cow import CowVolume, Origin, Pool, SnapshotView
from lunsync.snapshots.device import BlockDevice, StoreSnapshots
from lunsync.snapshots.errors import NotReady, SnapshotInUse, StorageError
from lunsync.snapshots.fsutil import copy_range, zero_range
from lunsync.snapshots.progress import RateWindow
from lunsync.snapshots.rbd import remove_image
from lunsync.snapshots.resync import ResyncVolume, extent_pieces, moved_pieces
from lunsync.snapshots.snapcat import Kind, PoolRecord, SnapshotCatalog, SnapshotPlan, SnapshotRecord
from lunsync.target.scsi.lu import LogicalUnit

if TYPE_CHECKING:
    from lunsync.provider.daemon import Array

log = logging.getLogger("lunsync.snapshots")
T = TypeVar("T")

HOLD_TIMEOUT_S = 10.0  # VSS's flush-and-hold bound
FILL_BATCH_CHUNKS = 64
FILL_COMMIT_INTERVAL_S = 1.0
STORE_SNAPSHOT_THREADS = 64  # members of one set whose store snapshots are taken at once


class HoldTimeout(InUse):
    """Writes did not drain within the bound; the set was abandoned and nothing was recorded."""


@dataclass(slots=True)
class SnapshotCounters:
    """Plain integers the metrics collector reads."""

    sets_created: int = 0
    snapshots_created: int = 0
    snapshots_deleted: int = 0
    hold_timeouts: int = 0
    last_hold_ms: float = 0.0
    hold_ms: list[float] = field(default_factory=list)  # recent holds, newest last (bounded)


@dataclass(slots=True)
class FlattenJob:
    """A flatten of a clone LUN running (or run) in the background: ``done`` of ``total`` units (the store's: RBD
    objects), its state and, once it failed, why. Times are wall-clock (``time.time()``)."""

    lun: str
    started_at: float
    state: str = "running"  # running, done, failed, stopped (the daemon stopped first: flatten it again)
    done: int = 0
    total: int = 0
    finished_at: float | None = None
    error: str | None = None
    stop: bool = False  # set on the loop, read by the store's progress callback: stop at the next object
    task: asyncio.Task[None] | None = None

    @property
    def percent(self) -> float:
        if self.state == "done":
            return 100.0
        return 100.0 * self.done / self.total if self.total else 0.0


@dataclass(slots=True)
class Exposure:
    snapshot_id: int
    target: str
    lun: int
    lu: LogicalUnit


@dataclass(slots=True)
class HeldSet:
    """A snapshot set between :meth:`SnapshotService.prepare` and its commit or abandon: the members held, each
    with the epoch its snapshot gets."""

    what: str  # the set's name, or its members, for the log
    set_name: str | None
    plans: list[SnapshotPlan]
    kinds: list[Kind]
    epochs: list[int]  # per plan
    vols: list[CowVolume]  # the copy-on-write members, held
    cow_epochs: list[int]
    cow_plans: list[SnapshotPlan]
    stores: list[tuple[SnapshotPlan, StoreSnapshots]]  # the members whose store takes the snapshot (RBD)
    gates: contextlib.AsyncExitStack  # their LUNs' write gates (and the other gateways' holds), held
    store_gates: list[contextlib.AsyncExitStack]  # per store member: its LUN's gate alone (also closed by ``gates``)
    requested: float
    started: float  # perf_counter when the hold closed
    drained: float
    landing: int  # writes still landing on the members' I/O threads when the hold closed (they are in the set)
    state: str = "held"  # held, committed, abandoned
    watchdog: asyncio.TimerHandle | None = None
    expiry: asyncio.Task[None] | None = None


@dataclass(slots=True)
class TakenSet:
    """A committed snapshot set whose catalog record is pending: :meth:`SnapshotService.finish` says how it went."""

    held: HeldSet
    made: list[tuple[SnapshotPlan, StoreSnapshots]]
    members: set[tuple[int, int]]  # (lun id, epoch) of the copy-on-write members
    hold_ms: float  # the longest any member's writes were held
    released: float
    lun_hold_ms: dict[str, float] = field(default_factory=dict)  # per member LUN, how long its writes were held
    times: list[float] = field(default_factory=list)  # the catalog transaction's start and end, when local


class SnapshotService:
    """Snapshots of the LUNs of one :class:`Array`."""

    def __init__(self, array: Array, *, hold_timeout_s: float = HOLD_TIMEOUT_S) -> None:
        self.array = array
        self.cat = SnapshotCatalog(array.catalog)
        self.hold_timeout_s = hold_timeout_s
        self.counters = SnapshotCounters()
        self.volumes: dict[str, CowVolume] = {}
        self.exposures: dict[int, Exposure] = {}
        self.views: dict[int, SnapshotView] = {}  # snapshot id -> the differential view in use
        # Snapshot id -> a filled clone's file, open once for every reader (exposure, restores, redirected views) and
        # closed when the snapshot is deleted: a descriptor per reader would leak, and keep a deleted clone's space.
        self.files: dict[int, FileBackend] = {}
        # Snapshot id -> the read-only device of a snapshot its LUN's store keeps (RBD), opened once for every reader
        # like a clone's file, closed when the snapshot is deleted.
        self.store_views: dict[int, BlockDevice] = {}
        self.fill_progress: dict[int, tuple[int, int]] = {}  # clone id -> (chunks done, total)
        self.fill_rates: dict[int, RateWindow] = {}  # clone id -> its fill's rate over wall-clock time
        self._pools: dict[int, Pool] = {}
        self._fills: dict[int, asyncio.Task[None]] = {}
        self.flattens: dict[str, FlattenJob] = {}
        self.store_space: dict[int, int] = {}  # snapshot id -> bytes its store keeps for it, as last measured  # LUN name -> its latest flatten (kept while the LUN lives)
        self._lock = asyncio.Lock()
        # The (lun id, epoch) of a snapshot (set) whose record is committing, and a future set once it has or failed.
        self._recording: tuple[set[tuple[int, int]], asyncio.Future[None]] | None = None
        self._early_invalid: dict[tuple[int, int], str] = {}
        # Invalidations the catalog could not take (noted in the pool's map log meanwhile), retried by _recorder.
        self._unrecorded_invalid: dict[tuple[int, int], str] = {}
        self._recorder: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        # Catalog commits a snapshot operation waits for get a thread of their own: in the default executor they
        # would queue behind the LUNs' fdatasyncs and the copy-on-write batches, for seconds under load.
        self._catalog_executor = ThreadPoolExecutor(1, thread_name_prefix="snapshot-catalog")
        # The store snapshots of a set are taken under the write hold, one thread each so that they all wait on the
        # cluster at once: the default executor has cpu_count + 4 threads, which a set of 8 on 2 cores would queue
        # for in two rounds, and which other work (opening images) shares.
        self._store_executor = ThreadPoolExecutor(STORE_SNAPSHOT_THREADS, thread_name_prefix="store-snapshot")
        default = self.cat.ensure_default_pool()
        # Open it now, before any I/O: creating its pool.db (a few durable SQLite commits) would otherwise fall on the
        # first snapshot's path, on the event loop, while the LUNs' writes keep the disk busy.
        try:
            self.pool(default)
        except (OSError, StorageError, sqlite3.Error) as e:  # serve anyway; the first snapshot reports it
            log.error("pool %s at %s cannot be opened: %s", default.name, default.path, e)

    # --- pools -----------------------------------------------------------------------------------------------------

    def pool(self, rec: PoolRecord) -> Pool:
        p = self._pools.get(rec.id)
        if p is None:
            p = self._pools[rec.id] = Pool(rec.name, rec.path, rec.capacity_bytes)
        return p

    def _pool_by_id(self, pool_id: int) -> Pool:
        if pool_id not in self._pools:
            rec = next((p for p in self.cat.list_pools() if p.id == pool_id), None)
            if rec is None:
                raise NotFound(f"pool id {pool_id} does not exist")
            return self.pool(rec)
        return self._pools[pool_id]

    def create_pool(self, name: str, path: str, capacity_bytes: int | None = None, *,
                    create: bool = False) -> PoolRecord:
        """Register a pool directory. One that does not exist is refused (Invalid) unless ``create``: a mistyped path
        would otherwise put the snapshots' data somewhere nobody looks, often on the wrong file system."""
        rec = self.cat.create_pool(name, path, capacity_bytes)
        missing = None
        if not os.path.isdir(rec.path):
            if os.path.lexists(rec.path):
                missing = f"pool path {rec.path} exists and is not a directory"
            elif not create:
                missing = (f"pool path {rec.path} does not exist; create the directory first, or ask lunsync to "
                           "create it (\"create\": true, or lunsync pool create --create)")
        if missing is not None:
            self.cat.forget_pool(rec.id)
            raise Invalid(missing)
        try:
            self.pool(rec)  # creates the directory; a path that cannot be used is refused now, not at first write
        except BaseException:
            self.cat.forget_pool(rec.id)
            raise
        log.info("pool %s created at %s%s", rec.name, rec.path,
                 f", capacity {rec.capacity_bytes} bytes" if rec.capacity_bytes else "")
        return rec

    def delete_pool(self, name: str) -> PoolRecord:
        """Forget an unused pool (see :meth:`SnapshotCatalog.delete_pool`) and close its map database. Its directory
        and files stay where they are: they may sit on storage the operator wants to look at or reuse."""
        rec = self.cat.delete_pool(name)
        p = self._pools.pop(rec.id, None)
        if p is not None:
            p.close()
        log.info("pool %s deleted (its directory %s is left in place)", rec.name, rec.path)
        return rec

    def pool_usage(self, rec: PoolRecord) -> dict[str, int | None]:
        """Capacity, use and free space: use is what the pool's files really hold on disk."""
        p = self.pool(rec)
        used = 0
        with os.scandir(p.path) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    used += entry.stat(follow_symlinks=False).st_blocks * 512
        st = os.statvfs(p.path)
        capacity = rec.capacity_bytes if rec.capacity_bytes is not None else st.f_blocks * st.f_frsize
        return {"capacity_bytes": capacity, "used_bytes": used, "free_bytes": p.free_bytes,
                "copy_bytes": p.used_bytes}

    async def _keep_invalid(self, lun_id: int, epochs: list[int], reason: str, exc: BaseException) -> None:
        """The catalog cannot record an invalidation: note it durably in the LUN's pool (its map log) instead, so the
        origin write may proceed, and keep trying the catalog. Raises when the pool cannot note it either: then
        nothing durable would say the snapshot lost a chunk, and the write must not proceed."""
        vol = next((v for v in self.volumes.values() if v.lun_id == lun_id), None)
        pool = vol.pool if vol is not None else None
        if pool is None:
            raise StorageError(f"cannot record that snapshot epoch(s) {epochs} are invalid: {exc}") from exc
        await asyncio.to_thread(pool.record_invalid, lun_id, epochs)
        log.error("catalog cannot record that lun id %d's snapshot epoch(s) %s are invalid (%s): kept in pool %s's "
                  "map log, the catalog is retried", lun_id, epochs, exc, pool.name)
        self._remember_invalid(lun_id, epochs, reason)

    def _remember_invalid(self, lun_id: int, epochs: Sequence[int], reason: str) -> None:
        for e in epochs:
            self._unrecorded_invalid[(lun_id, e)] = reason
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.get_running_loop().create_task(self._record_invalid_later(),
                                                                    name="snapshot-invalid-recorder")

    async def _record_invalid_later(self) -> None:
        """Bring the invalidations the catalog missed into it, as soon as it takes writes again."""
        delay = 0.5
        while self._unrecorded_invalid:
            await asyncio.sleep(delay)
            for (lun_id, e), reason in list(self._unrecorded_invalid.items()):
                try:
                    await self._catalog_thread(self.cat.mark_invalid, lun_id, [e], reason)
                except (CatalogError, sqlite3.Error, OSError):
                    delay = min(delay * 2, 10.0)
                    break
                self._unrecorded_invalid.pop((lun_id, e), None)
                log.info("catalog now records lun id %d's snapshot epoch %d as invalid", lun_id, e)

    def as_known(self, rec: SnapshotRecord) -> SnapshotRecord:
        """``rec`` with what the daemon knows and the catalog has not recorded yet (an invalidation it missed)."""
        reason = self._unrecorded_invalid.get((rec.lun_id or 0, rec.epoch)) if rec.state == "valid" else None
        return rec if reason is None else replace(rec, state="invalid", invalid_reason=reason[:500])

    async def _retry_degraded(self, which: Sequence[int | None]) -> None:
        """Let read-only pools among ``which`` (pool ids) try their checkpoints again, so a snapshot taken once
        space is back is valid (on the catalog thread: the checkpoints are durable SQLite commits)."""
        for p_id, p in list(self._pools.items()):
            if p.degraded is not None and p_id in which:
                await self._catalog_thread(p.retry_checkpoints)

    def attention(self) -> list[str]:
        """What an operator must look at: pools that take no new copies and LUNs whose pool could not be opened,
        each with the snapshots concerned and the error as it was met."""
        out = []
        by_pool: dict[int, list[str]] = {}
        for rec in self.cat.list_snapshots():
            if rec.pool_id is not None:
                by_pool.setdefault(rec.pool_id, []).append(rec.full_name)
        for pool_id, p in sorted(self._pools.items()):
            if p.degraded is not None:
                snaps = ", ".join(by_pool.get(pool_id, [])) or "none"
                out.append(f"pool {p.name} is read-only ({p.degraded}); free space there. Snapshots in it: {snaps}")
        for name, vol in sorted(self.volumes.items()):
            if vol.pool_unavailable is not None:
                out.append(f"lun {name}: {vol.pool_unavailable}; its snapshots cannot be read")
        return out

    # --- LUNs come and go ------------------------------------------------------------------------------------------

    @staticmethod
    def copies_on_write(backend: BlockDevice) -> bool:
        """Whether this engine can keep snapshots of ``backend``: it preserves chunks through the descriptor that
        the file and block backends offer, and an RBD image offers none."""
        return hasattr(backend, "fileno")

    def wrap(self, rec: LunRecord, backend: BlockDevice) -> CowVolume:
        """The LUN's device: its backend behind copy-on-write, with the snapshots that still need it."""
        if not self.copies_on_write(backend):
            raise TypeError(f"lun {rec.name}: copy-on-write needs a backend with a descriptor, not {backend!r}")
        origin = cast(Origin, backend)  # the file or block backend: the copy-on-write engine works on their descriptor
        old = self.volumes.get(rec.name)
        if old is not None and old.lun_id == rec.id:
            old.reopen(origin)  # reopened with other flags: same maps, same state
            return old
        prec = self.cat.volume_pool(rec.id)
        epochs = [s.epoch for s in self.cat.list_snapshots(rec.name) if s.lun_id == rec.id and s.needs_cow]
        lun_id = rec.id

        async def on_invalid(epochs: list[int], reason: str) -> None:
            await self._invalidate(lun_id, epochs, reason)

        vol = CowVolume(origin, None, rec.id, rec.chunk_size_bytes, epochs, on_invalid=on_invalid, name=rec.name,
                        staging_bytes=self.array.write_staging_bytes)
        if prec is not None:
            try:
                vol.attach_pool(self.pool(prec))
                # Invalidations only the pool recorded (the catalog could not, and then the daemon stopped).
                lost = sorted(self.pool(prec).invalid_epochs(rec.id) & set(vol.epochs))
                for e in lost:
                    vol.forget_epoch(e)
                if lost:
                    log.error("lun %s: snapshot epoch(s) %s are invalid by pool %s's record; telling the catalog",
                              rec.name, lost, prec.name)
                    self._remember_invalid(rec.id, lost, "a chunk could not be preserved (recorded by the pool)")
            except (OSError, StorageError, sqlite3.Error) as e:
                # The origin serves anyway: its snapshots there cannot be read, and lose their copies (invalid) at
                # the first write that needs one.
                vol.pool_unavailable = f"pool {prec.name} at {prec.path} cannot be opened: {e}"
                log.error("lun %s: %s", rec.name, vol.pool_unavailable)
        self.volumes[rec.name] = vol
        return vol

    async def release_origin(self, name: str) -> None:
        """Before LUN ``name`` is deleted: refused while snapshots depend on it or while it is being flattened;
        filled clones are detached."""
        job = self.flattens.get(name)
        if job is not None and job.state == "running":
            raise InUse(f"lun {name!r} is being flattened ({job.percent:.0f}%); wait for it to finish")
        self.flattens.pop(name, None)
        async with self._lock:
            rec = self.array.catalog.get_lun(name)
            maps = self.array.catalog.lun_mappings(name)
            if maps:  # the catalog refuses this too, but only after the clones would have been detached
                shown = ", ".join(f"{iqn} lun {n}" for iqn, n in maps)
                raise InUse(f"lun {name!r} is still mapped ({shown}); unmap it first")
            detached = self.cat.release_origin(name)
            vol = self.volumes.pop(name, None)
            pool = vol.pool if vol is not None else None
            if vol is not None:
                vol.close_pool()
            if pool is not None:
                pool.drop_lun(rec.id)
            for s in detached:
                log.info("clone %s no longer depends on its origin", s.full_name)

    async def load(self) -> None:
        """After the LUNs and targets are up: resume clone fills and show the exposed snapshots again."""
        targets = set()
        for rec in self.cat.list_snapshots():
            # With serve --workers, a clone fills in the worker serving its origin, and an exposure is shown by the
            # worker serving its target; one process does both.
            if (rec.kind == "clone" and not rec.filled and rec.state == "valid" and rec.lun_id is not None
                    and self.array.serves_lun(rec.lun_name)):
                self._start_fill(rec)
            if (rec.exposed_target is not None and rec.exposed_lun is not None
                    and self.array.serves_target(rec.exposed_target)):
                try:
                    lu = await self._make_lu(rec)
                    self.exposures[rec.id] = Exposure(rec.id, rec.exposed_target, rec.exposed_lun, lu)
                    targets.add(rec.exposed_target)
                except (CatalogError, StorageError, OSError) as e:  # serve the rest; the log says which and why
                    log.error("snapshot %s: cannot expose it again: %s", rec.full_name, e)
        for iqn in targets:
            self.array.build_target(iqn)
        for job in self.cat.flatten_jobs():  # with serve --workers, in the worker serving the LUN
            if job.lun in self.array.luns:
                self.resume_flatten(job.lun)
        # In the background: after a crash the image's lock may still be the dead daemon's until the cluster gives
        # up on it (half a minute), and serving must not wait for that.
        self._sweeper = asyncio.get_running_loop().create_task(self._remove_leftover_store_snapshots(),
                                                               name="store-snapshot-sweep")

    async def _remove_leftover_store_snapshots(self) -> None:
        """Remove the store snapshots (RBD) lunsync made whose record never committed (a crash between taking them
        and recording them): nothing refers to them, and they would keep the image from being deleted."""
        known: dict[str, set[str]] = {}
        for rec in self.cat.list_snapshots():
            if rec.kind == "rbd":
                known.setdefault(rec.lun_name, set()).add(rec.name)
        for name in list(self.array.luns):
            st = self._store_of(name)
            if st is None or self._closing:
                continue
            try:
                leftover = sorted(set(await asyncio.to_thread(st.list_snapshots)) - known.get(name, set()))
                for snap in leftover:
                    if self._closing:
                        return
                    await asyncio.to_thread(st.remove_snapshot, snap)
                    log.warning("lun %s: removed the store's snapshot of %s, which was never recorded (a crash "
                                "while it was taken)", name, snap)
            except (StorageError, OSError) as e:  # serve anyway; the next start tries again
                log.error("lun %s: cannot look for leftover store snapshots: %s", name, e)

    def exposed_on(self, iqn: str) -> dict[int, LogicalUnit]:
        """The snapshots shown on ``iqn``, by LUN number (the daemon's build_target adds them to the LUN map)."""
        return {e.lun: e.lu for e in self.exposures.values() if e.target == iqn}

    async def close(self) -> None:
        if self._recorder is not None:
            self._recorder.cancel()
        if self._sweeper is not None:
            # Not cancelled: its librbd call would run on in its thread while the image closes under it. It stops
            # before its next call instead.
            self._closing = True
            await asyncio.wait([self._sweeper])
        for task in self._fills.values():
            task.cancel()
        if self._fills:
            await asyncio.wait(list(self._fills.values()))
        # A flatten's librbd call stops at its next object when asked (it must not run on while the image closes).
        await asyncio.gather(*(self.stop_flatten(lun) for lun in list(self.flattens)))
        for vol in self.volumes.values():
            vol.close_pool()
        for p in self._pools.values():
            p.close()
        for f in self.files.values():
            await f.close()
        self.files.clear()
        for v in self.store_views.values():
            await v.close()
        self.store_views.clear()
        self._catalog_executor.shutdown()
        self._store_executor.shutdown()

    async def _catalog_thread(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking catalog call on the service's own catalog thread."""
        return await asyncio.get_running_loop().run_in_executor(self._catalog_executor, fn, *args)

    async def backup(self, dest_dir: str) -> BackupManifest:
        """Write the array's metadata backup (:mod:`lunsync.snapshots.backup`) into ``dest_dir`` while LUN I/O goes
        on. Snapshot operations wait meanwhile, so the catalog's copy and the pools' maps copied after it name the
        same snapshots."""
        async with self._lock:
            pools = [(p.name, p.path) for p in self.cat.list_pools()]
            return await self._catalog_thread(self.array.catalog.backup_metadata, pools, dest_dir)

    # --- snapshots -------------------------------------------------------------------------------------------------

    async def create(self, specs: Sequence[tuple[str, str]], kind: Kind = "differential", pool: str | None = None,
                     set_name: str | None = None, labels: dict[str, str] | None = None
                     ) -> tuple[list[SnapshotRecord], float]:
        """Take one point in time across every ``(lun, snap)``, each snapshot with ``labels``; returns the records
        and the hold time in ms. This is the whole of :meth:`prepare`, :meth:`commit`, the catalog record and
        :meth:`finish`, with this service the only participant.

        The point in time is fixed once in-flight writes have drained and each member's new epoch is set in memory:
        writes are released right there, and the catalog commits after. That order is crash-safe because a snapshot
        whose record never committed does not exist after a crash; the copies made for its epoch meanwhile either
        serve older snapshots too (they hold those snapshots' contents) or are freed when the pool reopens, and no
        later snapshot reuses the epoch (``epoch_floor``). If the commit fails, the epochs are abandoned in memory.

        The log line's times count from this call, waiting for another snapshot operation included, to the moment
        the record is durable (the catalog's COMMIT returned in its thread) and to the moment this returns."""
        held = await self.prepare(specs, kind, pool, set_name)
        taken = await self.commit(held)
        try:
            def commit() -> None:
                taken.times.append(time.perf_counter())
                self.cat.record_snapshots(held.plans, held.kinds, set_name, held.epochs,
                                          taken.hold_ms if set_name is not None else None, labels)
                taken.times.append(time.perf_counter())  # durable: the COMMIT (synchronous=FULL) has returned

            await self._catalog_thread(commit)
        except BaseException:
            await self.finish(taken, recorded=False)
            raise
        return await self.finish(taken, recorded=True), taken.hold_ms

    async def prepare(self, specs: Sequence[tuple[str, str]], kind: Kind = "differential", pool: str | None = None,
                      set_name: str | None = None) -> HeldSet:
        """Phase one of a snapshot set: check it against the catalog, hold new writes on every member and drain the
        ones in flight (staged writes land first). Returns once the members are held; their snapshots are taken by
        :meth:`commit`, or nothing is by :meth:`abandon`. Neither arriving within ``hold_timeout_s`` abandons the
        hold by itself: a coordinator that died must not leave the LUNs held. Cancelling a prepare that is still
        draining releases what it holds. Snapshot operations on this service wait from here until :meth:`finish` (or
        the abandon). Raises what the catalog refuses, InUse for a LUN under restore, HoldTimeout."""
        requested = time.perf_counter()
        await self._lock.acquire()
        try:
            held = await self._prepare(specs, kind, pool, set_name, requested)
        except BaseException:
            self._lock.release()
            raise
        held.watchdog = asyncio.get_running_loop().call_later(self.hold_timeout_s, self._expire, held)
        return held

    async def _prepare(self, specs: Sequence[tuple[str, str]], kind: Kind, pool: str | None,
                       set_name: str | None, requested: float) -> HeldSet:
        plans = self.cat.plan_snapshots(list(specs), kind, pool, set_name)  # every refusal before anything is held
        for plan in plans:
            live = self.array.luns.get(plan.lun_name)
            if live is not None and isinstance(live.lu.device, ResyncVolume):
                # Its origin file holds a mix of restored and not-yet-restored regions, which is not what the
                # initiators see; a snapshot of it would be silently wrong.
                raise InUse(f"lun {plan.lun_name!r} is being restored (resync in progress); snapshot it once "
                            "the restore is done")
        # Members whose store keeps snapshots itself (RBD) get the store's; the others lunsync's copy-on-write.
        stores = [self._store_of(p.lun_name) for p in plans]
        if kind == "clone" and any(st is not None for st in stores):
            names = ", ".join(p.lun_name for p, st in zip(plans, stores, strict=True) if st is not None)
            raise Invalid(f"lun(s) {names} keep their snapshots in RBD, where a snapshot is instant and a clone "
                          "is a new image: take a snapshot, then lunsync lun create NEW --from LUN@SNAP")
        cow_plans = [p for p, st in zip(plans, stores, strict=True) if st is None]
        for plan in cow_plans:
            if plan.lun_name not in self.volumes:  # served unwrapped: no snapshots of its own, no descriptor
                raise Invalid(f"lun {plan.lun_name!r} cannot be snapshotted now: its store keeps no snapshots "
                              "of its own and offers no file to preserve into (is it available?); nothing was "
                              "recorded")
        vols = [self.volumes[p.lun_name] for p in cow_plans]
        held_stores = [(p, st, self.array.luns[p.lun_name].lu) for p, st in zip(plans, stores, strict=True)
                       if st is not None]
        kinds: list[Kind] = [kind if st is None else "rbd" for st in stores]
        await self._retry_degraded([plan.pool.id for plan in cow_plans])
        for plan, vol in zip(cow_plans, vols, strict=True):
            p = self.pool(plan.pool)
            if vol.pool is not p:
                vol.detach_pool()
                vol.attach_pool(p)
        floors = {p.lun_name: v.epoch_floor for p, v in zip(cow_plans, vols, strict=True)}
        epochs = [max(plan.last_epoch, floors.get(plan.lun_name, 0)) + 1 for plan in plans]
        cow_epochs = [e for e, st in zip(epochs, stores, strict=True) if st is None]
        what = set_name or ",".join(f"{a}@{b}" for a, b in specs)
        # Writes staged before the set (acknowledged, not yet on the origin) belong in it: they land first, with
        # staging paused meanwhile so that none is staged behind them, and the hold then has none to wait for.
        for v in vols:
            v.pause_staging()
        try:
            try:
                await asyncio.wait_for(asyncio.gather(*(v.land_staged() for v in vols)), self.hold_timeout_s)
            except TimeoutError:
                self.counters.hold_timeouts += 1
                raise HoldTimeout(f"staged writes did not reach their LUNs within {self.hold_timeout_s:g} s; "
                                  "nothing was recorded") from None
            started = time.perf_counter()
            # Close every member's gate in one step; only unmaps and resizes in flight need waiting for. A store
            # whose writes wait for the network (RBD) is held by its LUN's write gate instead: new writes queue,
            # and the hold is complete once the writes in flight have been acknowledged.
            busy = [v for v in vols if not v.hold_nowait()]
            landing = sum(v.landing for v in vols)
        finally:
            for v in vols:
                v.resume_staging()
        gates = contextlib.AsyncExitStack()
        store_gates = [contextlib.AsyncExitStack() for _ in held_stores]
        for g in store_gates:
            gates.push_async_callback(g.aclose)  # every way out of the hold ends each; a second aclose is a no-op
        try:
            if busy or held_stores:  # else the hold is complete: no trip through the event loop
                await asyncio.wait_for(self._hold_all(busy, [(lu, g) for (_, _, lu), g in
                                                             zip(held_stores, store_gates, strict=True)],
                                                      self._peer_hold([p.lun_name for p, _, _ in held_stores],
                                                                      gates)),
                                       self.hold_timeout_s)
        except PeersNotHeld as e:
            await gates.aclose()
            for v in vols:
                v.release()
            self.counters.hold_timeouts += 1
            log.warning("snapshot set %s abandoned: %s", what, e)
            raise HoldTimeout(f"{e}; nothing was recorded") from None
        except TimeoutError:
            await gates.aclose()
            for v in vols:
                v.release()
            self.counters.hold_timeouts += 1
            log.warning("snapshot set %s abandoned: writes did not drain within %.1f s", what, self.hold_timeout_s)
            raise HoldTimeout(f"in-flight writes did not drain within {self.hold_timeout_s:g} s; nothing was "
                              "recorded") from None
        except BaseException:
            await gates.aclose()
            for v in vols:
                v.release()
            raise
        return HeldSet(what, set_name, plans, kinds, epochs, vols, cow_epochs, cow_plans,
                       [(p, st) for p, st, _ in held_stores], gates, store_gates, requested, started,
                       time.perf_counter(), landing)

    def _expire(self, held: HeldSet) -> None:
        """The prepare's own deadline: neither commit nor abandon came."""
        if held.state != "held":
            return
        self.counters.hold_timeouts += 1
        log.warning("snapshot set %s abandoned: held %.1f s without a commit (its coordinator is gone?)", held.what,
                    self.hold_timeout_s)
        held.expiry = asyncio.get_running_loop().create_task(self.abandon(held), name=f"expire-{held.what}")

    async def abandon(self, held: HeldSet) -> None:
        """Release a prepared hold and take nothing. Idempotent; a set already committed is left to :meth:`finish`."""
        if held.state != "held":
            return
        held.state = "abandoned"
        if held.watchdog is not None:
            held.watchdog.cancel()
        try:
            await held.gates.aclose()
        finally:
            for v in held.vols:
                v.release()
            self._lock.release()

    async def commit(self, held: HeldSet) -> TakenSet:
        """Phase two: take every member's snapshot at the held instant (set its epoch, or the store's snapshot), then
        release writes. The snapshots exist in memory only: the catalog record comes next, then :meth:`finish`.
        Raises HoldTimeout when the hold was already abandoned (its deadline passed); on any failure nothing is
        taken and the hold is released."""
        if held.state != "held":
            raise HoldTimeout(f"snapshot set {held.what}: the hold was abandoned before its commit (after "
                              f"{self.hold_timeout_s:g} s, or by request); nothing was taken")
        held.state = "committed"
        if held.watchdog is not None:
            held.watchdog.cancel()
        added: list[CowVolume] = []
        made: list[tuple[SnapshotPlan, StoreSnapshots]] = []
        lun_released: dict[str, float] = {}
        try:
            try:
                for vol, epoch in zip(held.vols, held.cow_epochs, strict=True):
                    vol.add_snapshot(epoch)
                    added.append(vol)
                if held.stores:
                    made = await self._store_snapshots(held.stores, held.store_gates, lun_released)
            except BaseException:
                for vol, epoch in zip(added, held.cow_epochs, strict=False):
                    vol.forget_epoch(epoch)  # still held: nothing was preserved for it
                raise
            finally:
                await held.gates.aclose()
                for v in held.vols:
                    v.release()
                released = time.perf_counter()
            # Writes that were still landing on a member's I/O threads are in its snapshot (see
            # CowVolume.hold_nowait): it is recorded, and so may be read, only once they have landed.
            await asyncio.gather(*(v.settle_snapshot(e) for v, e in zip(held.vols, held.cow_epochs, strict=True)))
        except BaseException:
            self._lock.release()
            raise
        members = {(p.lun_id, e) for p, e in zip(held.cow_plans, held.cow_epochs, strict=True)}
        self._recording = (members, asyncio.get_running_loop().create_future())
        lun_hold_ms = {p.lun_name: (lun_released.get(p.lun_name, released) - held.started) * 1000
                       for p in held.plans}
        return TakenSet(held, made, members, (released - held.started) * 1000, released, lun_hold_ms)

    async def finish(self, taken: TakenSet, *, recorded: bool) -> list[SnapshotRecord]:
        """After the catalog record of a committed set: ``recorded`` says whether it committed. If it did, mark what
        failed to preserve meanwhile, count and start the clones' fills, and return the records; if not, abandon
        the epochs and free their copies (and the store snapshots), and return nothing. Snapshot operations on this
        service may proceed afterwards."""
        held = taken.held
        recording = self._recording
        try:
            self._recording = None
            if recording is not None:
                recording[1].set_result(None)  # before abandoning: a hold waits for writes that may wait for this
            if not recorded:
                for vol, epoch in zip(held.vols, held.cow_epochs, strict=True):
                    await vol.abandon_snapshot(epoch)
                await self._unmake_store_snapshots(taken.made)
                for key in taken.members:
                    self._early_invalid.pop(key, None)
                log.warning("snapshot%s %s not taken: the catalog refused it after writes resumed; its copies are "
                            "freed", " set " + held.set_name if held.set_name else "", held.what)
                return []
            return await self._recorded(taken)
        finally:
            self._lock.release()

    async def _recorded(self, taken: TakenSet) -> list[SnapshotRecord]:
        held = taken.held
        plans = held.plans
        recs = self.cat.get_snapshots([(p.lun_name, p.name) for p in plans])
        by_lun = dict(zip((p.lun_name for p in held.cow_plans), held.vols, strict=True))
        # A preservation that failed while the record was committing could not mark it invalid yet.
        for i, rec in enumerate(recs):
            cow = by_lun.get(rec.lun_name)
            if cow is None or rec.epoch in cow.epochs:
                continue
            reason = self._early_invalid.pop((rec.lun_id or 0, rec.epoch), "a chunk could not be preserved")
            await self._catalog_thread(self.cat.mark_invalid, rec.lun_id or 0, [rec.epoch], reason)
            recs[i] = replace(rec, state="invalid", invalid_reason=reason[:500])
            log.error("snapshot %s is now invalid: %s", rec.full_name, reason)
        for key in taken.members:
            self._early_invalid.pop(key, None)
        hold_ms = taken.hold_ms
        self.counters.last_hold_ms = hold_ms
        self.counters.hold_ms = [*self.counters.hold_ms[-99:], hold_ms]
        self.counters.snapshots_created += len(recs)
        if held.set_name is not None:
            self.counters.sets_created += 1
        for rec in recs:
            cow = by_lun.get(rec.lun_name)
            if rec.kind == "clone" and cow is not None and rec.epoch in cow.epochs:
                self._start_fill(rec)
        times = taken.times
        durable = (f"durable in the catalog {(times[1] - held.requested) * 1000:.2f} ms after the request: waited "
                   f"{(times[0] - taken.released) * 1000:.2f} ms for the commit thread, transaction "
                   f"{(times[1] - times[0]) * 1000:.2f} ms" if len(times) == 2 else "recorded by the coordinator")
        per_lun = "" if len(taken.lun_hold_ms) < 2 else " (per LUN: " + ", ".join(
            f"{n} {ms:.2f}" for n, ms in sorted(taken.lun_hold_ms.items())) + ")"
        landing = f", {held.landing} write(s) still landing on I/O threads" if held.landing else ""
        log.info("snapshot%s %s taken (%s, writes held %.2f ms%s: drain %.2f%s; %s; returned after %.2f ms)",
                 " set " + held.set_name if held.set_name else "", ", ".join(r.full_name for r in recs),
                 "/".join(sorted(set(held.kinds))), hold_ms, per_lun, (held.drained - held.started) * 1000, landing,
                 durable, (time.perf_counter() - held.requested) * 1000)
        return recs

    def _store_of(self, lun: str) -> StoreSnapshots | None:
        """The LUN's store when it keeps snapshots itself (RBD), else None."""
        live = self.array.luns.get(lun)
        return live.device if live is not None and isinstance(live.device, StoreSnapshots) else None

    def _peer_hold(self, names: Sequence[str], gates: contextlib.AsyncExitStack) -> Awaitable[None] | None:
        """When this daemon is one of several gateways and some of ``names`` are shared LUNs: what holds their writes
        on the other gateways too (its release is pushed onto ``gates``, so every way out of the hold ends it)."""
        peers = self.array.gateways
        if peers is None or not any(peers.shares(n) for n in names):
            return None
        hold_id = new_hold_id()
        gates.callback(peers.release_peers, hold_id)
        # A peer's hold outlives this one's bound a little: the release normally ends it well before.
        return peers.hold_peers(names, hold_id, self.hold_timeout_s + 1.0)

    @staticmethod
    async def _hold_all(busy: Sequence[CowVolume], lus: Sequence[tuple[LogicalUnit, contextlib.AsyncExitStack]],
                        peers: Awaitable[None] | None = None) -> None:
        """Complete the hold: drain the copy-on-write volumes still busy, and hold every store LUN's write gate (its
        writes in flight acknowledged, new ones queued) in the stack paired with it; meanwhile, ``peers`` holds the
        other gateways' writes to the shared ones."""
        async def local() -> None:
            if busy:
                await asyncio.gather(*(v.drain() for v in busy))
            for lu, gate in lus:
                await gate.enter_async_context(lu.gate.exclusive(0, lu.num_blocks))

        if peers is None:
            await local()
            return
        both = [asyncio.ensure_future(local()), asyncio.ensure_future(peers)]
        try:
            await asyncio.gather(*both)
        except BaseException:
            for t in both:
                t.cancel()
            await asyncio.gather(*both, return_exceptions=True)
            raise

    async def _store_snapshots(self, members: Sequence[tuple[SnapshotPlan, StoreSnapshots]],
                               gates: Sequence[contextlib.AsyncExitStack], released: dict[str, float]
                               ) -> list[tuple[SnapshotPlan, StoreSnapshots]]:
        """Take every member's store snapshot at once, each on its own thread (each is a round trip to the
        cluster), and release each member's writes (its stack in ``gates``) as soon as its own snapshot is made,
        noting when in ``released``. All or none: when one fails, those made are removed again and the failure is
        raised.

        Releasing one member before the others' snapshots exist keeps the set one point in time: every member was
        held (its writes in flight acknowledged) before any snapshot was begun, so no write acknowledged before
        that instant is missing from its snapshot; and a write let through on a member afterwards cannot be in that
        member's snapshot, which already exists. A host that issues a write to another member only after such a
        write is acknowledged finds that member still held until its own snapshot exists, so the dependent write
        is not in the set either."""
        loop = asyncio.get_running_loop()

        async def one(p: SnapshotPlan, st: StoreSnapshots, gate: contextlib.AsyncExitStack) -> None:
            try:
                await loop.run_in_executor(self._store_executor, st.create_snapshot, p.name)
            finally:  # made or failed, its writes need not wait for the others (a failed set removes the made)
                await gate.aclose()
                released[p.lun_name] = time.perf_counter()

        results = await asyncio.gather(*(one(p, st, g) for (p, st), g in zip(members, gates, strict=True)),
                                       return_exceptions=True)
        made = [m for m, r in zip(members, results, strict=True) if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self._unmake_store_snapshots(made)
            raise failed[0]
        return made

    async def _unmake_store_snapshots(self, made: Sequence[tuple[SnapshotPlan, StoreSnapshots]]) -> None:
        for p, st in made:
            try:
                await asyncio.to_thread(st.remove_snapshot, p.name)
            except (StorageError, OSError) as e:  # a leftover is replaced by the next snapshot of that name
                log.error("lun %s: the store's snapshot of %s, which was not taken, stays behind: %s",
                          p.lun_name, p.name, e)

    async def delete(self, lun: str, name: str) -> SnapshotRecord:
        async with self._lock:
            rec = self.cat.get_snapshot(lun, name)
            if rec.exposed_target is not None:
                self.cat.delete_snapshot(lun, name)  # raises InUse with the catalog's wording
            recovery = self.array.recovery.reading(rec.full_name) if self.array.recovery is not None else None
            if recovery is not None:
                # Its view (or clone file) serves the destination's uncopied regions and feeds the copier.
                raise InUse(f"snapshot {rec.full_name} is the source of recovery {recovery.id} "
                            f"({recovery.state.value}); cancel it or let it finish first")
            if self.array.owned_targets is not None:
                # A restore onto another worker's LUN reads this worker's view (remote_snapshot): its set is that
                # worker's, so it is found in the catalog.
                for row, pairs in self.array.catalog.recovery_sets():
                    if row.state not in ("done", "failed", "cancelled") and any(
                            p.snapshot == rec.full_name for p in pairs):
                        raise InUse(f"snapshot {rec.full_name} is the source of recovery {row.id} ({row.state}), "
                                    "run by another worker; cancel it or let it finish first")
            if rec.kind == "rbd":
                await self._delete_store_snapshot(rec)
                return rec
            fill = self._fills.pop(rec.id, None)
            if fill is not None:
                fill.cancel()
                await asyncio.wait([fill])
            vol = self.volumes.get(lun) if rec.lun_id is not None else None
            if vol is not None:
                await vol.hold()
            try:
                self.cat.delete_snapshot(lun, name)
                freed = await vol.drop_snapshot(rec.epoch) if vol is not None else 0
            finally:
                if vol is not None:
                    vol.release()
            view = self.views.pop(rec.id, None)
            if view is not None:
                view.valid = False
            file = self.files.pop(rec.id, None)
            if file is not None:
                await file.close()  # a restore still reading it fails cleanly (NotReady), as with a view
            self.fill_progress.pop(rec.id, None)
            if rec.kind == "clone":
                try:
                    os.unlink(self._clone_path(rec))
                except FileNotFoundError:
                    pass
            self.counters.snapshots_deleted += 1
            log.info("snapshot %s deleted (%d preserved chunk(s) freed)", rec.full_name, freed)
            await self._retry_degraded([rec.pool_id])
            return rec

    async def _delete_store_snapshot(self, rec: SnapshotRecord) -> None:
        """Delete a snapshot its LUN's store keeps: the store's snapshot first (refused while a clone depends on it,
        and then the record stays), the record after. A crash in between leaves a record whose store snapshot is
        gone, which a second delete removes."""
        st = self._store_of(rec.lun_name)
        if st is None:
            raise NotFound(f"the LUN of {rec.full_name} is not open, so its store's snapshot cannot be removed")
        view = self.store_views.pop(rec.id, None)
        if view is not None:
            await view.close()
        try:
            await asyncio.to_thread(st.remove_snapshot, rec.name)
        except SnapshotInUse as e:
            raise InUse(f"snapshot {rec.full_name}: {e}") from None
        self.cat.delete_snapshot(rec.lun_name, rec.name)
        self.counters.snapshots_deleted += 1
        log.info("snapshot %s deleted (with the store's snapshot)", rec.full_name)

    async def clone(self, lun: str, name: str, new_lun: str, *, image: str | None = None,
                    flatten: bool = False) -> LunRecord:
        """A new LUN ``new_lun`` that is a clone of snapshot ``lun@name`` made by its store (an RBD clone, image
        ``image``, default the new LUN's name, beside the origin's): instant, sharing the snapshot's data, writable.
        With ``flatten`` a background job (:meth:`start_flatten`) starts copying the clone's data in as this returns,
        after which the clone no longer depends on the snapshot (which can then be deleted). A failure leaves neither
        the LUN nor the image behind."""
        rec = self.as_known(self.cat.get_snapshot(lun, name))
        if rec.kind != "rbd":
            raise Invalid(f"snapshot {rec.full_name} is lunsync's own ({rec.kind}): make a LUN of it with lunsync lun "
                          "create NEW --from LUN@SNAP, which copies it in while serving it")
        st = self._store_of(rec.lun_name)
        if st is None:
            raise NotFound(f"the origin of {rec.full_name} is not open")
        path = await asyncio.to_thread(st.clone_snapshot, rec.name, image or new_lun)
        try:
            made = await self.array.create_lun(new_lun, None, path=path, backend="rbd", block_size=rec.block_size)
        except BaseException:
            try:
                await asyncio.to_thread(remove_image, self.array.ceph, path)
            except (StorageError, OSError) as e:
                log.error("clone %s of %s stays behind on the cluster: %s", path, rec.full_name, e)
            raise
        log.info("lun %s created as a clone of %s (rbd image %s)", new_lun, rec.full_name, path)
        if flatten:
            self.start_flatten(new_lun)
        return made

    def start_flatten(self, lun: str, *, started_at: float | None = None) -> FlattenJob:
        """Start making LUN ``lun``, a clone of a store's snapshot, independent of that snapshot (RBD flatten) in the
        background, while it serves I/O; the job (``flattens[lun]``) shows the progress. A flatten already running
        is returned as it is. Once the job is ``done`` the copy is durable and the snapshot may be deleted.

        The job is in the catalog before this returns, ``running`` until it ends: one stopped with its device (the
        daemon stopping, the LUN reopened) goes on when the LUN is served again (:meth:`resume_flatten`;
        ``started_at`` is then the first start's)."""
        st = self._store_of(lun)
        if st is None:
            raise Invalid(f"lun {lun!r} is not on a store that clones (an RBD image)")
        job = self.flattens.get(lun)
        if job is not None and job.state == "running":
            return job
        job = FlattenJob(lun, time.time() if started_at is None else started_at)
        self.cat.record_flatten(lun, "running", job.started_at)
        self.flattens[lun] = job
        job.task = asyncio.get_running_loop().create_task(self._flatten(st, job), name=f"flatten-{lun}")
        return job

    def resume_flatten(self, lun: str) -> None:
        """Take up LUN ``lun``'s flatten where the catalog left it: go on with one ``stopped`` (librbd stopped it
        between objects), show one that ended as it ended. One still ``running`` there was cut by a crash: it is
        shown ``failed``, and not flattened again by itself, since a flatten run again after librbd was killed in
        the middle of one has left objects uncopied (on Ceph 16.2), while the clone, still attached to its parent,
        reads them from there."""
        rec = next((r for r in self.cat.flatten_jobs() if r.lun == lun), None)
        if rec is None or (lun in self.flattens and self.flattens[lun].state == "running"):
            return
        if rec.state == "running":
            error = ("the daemon died while flattening (kill -9, a crash, power loss); the clone still depends on "
                     "its snapshot. Check it against the snapshot before flattening it again: a flatten run again "
                     "after one that librbd could not finish may leave objects uncopied")
            finished = time.time()
            self.cat.record_flatten(lun, "failed", rec.started_at, finished_at=finished, done=rec.done,
                                    total=rec.total, error=error)
            self.flattens[lun] = FlattenJob(lun, rec.started_at, "failed", rec.done, rec.total, finished, error)
            log.error("lun %s: its flatten was cut by a crash: %s", lun, error)
            return
        if rec.state != "stopped":
            self.flattens[lun] = FlattenJob(lun, rec.started_at, rec.state, rec.done, rec.total, rec.finished_at,
                                            rec.error)
            return
        try:
            self.start_flatten(lun, started_at=rec.started_at)
        except (CatalogError, StorageError, OSError) as e:  # its LUN is not served on a store now: say so, go on
            log.error("lun %s: cannot resume its flatten: %s", lun, e)
            return
        log.info("lun %s: flatten resumed (first started %s)", lun,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.started_at)))

    async def stop_flatten(self, lun: str) -> None:
        """Stop a flatten of ``lun`` that is running, at its next object, and wait for it: before the LUN's device
        closes, since librbd's flatten must not run on while the image closes. The job then shows ``stopped``."""
        job = self.flattens.get(lun)
        if job is not None and job.task is not None and not job.task.done():
            job.stop = True
            await asyncio.wait([job.task])

    async def _flatten(self, st: StoreSnapshots, job: FlattenJob) -> None:
        def progress(done: int, total: int) -> bool:  # on the store's thread: plain stores, read on the loop
            job.done, job.total = done, total
            return not job.stop

        started = time.perf_counter()
        try:
            finished = await asyncio.to_thread(st.flatten, progress)
        except (StorageError, OSError) as e:
            job.state, job.error = "failed", str(e)
            log.error("lun %s: flatten failed after %.1f s: %s", job.lun, time.perf_counter() - started, e)
        else:
            job.state = "done" if finished else "stopped"
            if finished:
                job.done = job.total  # librbd reports each object as it starts it: the last report is one short
                log.info("lun %s flattened in %.1f s: it no longer depends on a snapshot", job.lun,
                         time.perf_counter() - started)
            else:
                log.warning("lun %s: flatten stopped at %d of %d objects (its device is closing); it goes on when "
                            "the LUN is served again", job.lun, job.done, job.total)
        job.finished_at = time.time()
        try:
            await self._catalog_thread(functools.partial(
                self.cat.record_flatten, job.lun, job.state, job.started_at, finished_at=job.finished_at,
                done=job.done, total=job.total, error=job.error))
        except (CatalogError, sqlite3.Error) as e:  # the LUN was deleted meanwhile, or the catalog is failing
            log.error("lun %s: the flatten's end (%s) is not recorded: %s", job.lun, job.state, e)

    async def measure_store_space(self, recs: Sequence[SnapshotRecord]) -> None:
        """Ask the stores (RBD) what they keep for each of their snapshots among ``recs``, in a thread, for
        :meth:`space_bytes` to report. A store that cannot say keeps its last figure (0 if none), logged."""
        asks = [(rec, st) for rec in recs if rec.kind == "rbd" and (st := self._store_of(rec.lun_name)) is not None]
        if not asks:
            return

        def measure() -> dict[int, int]:
            out: dict[int, int] = {}
            for rec, st in asks:
                try:
                    out[rec.id] = st.snapshot_space_bytes(rec.name)
                except (StorageError, OSError) as e:
                    log.warning("snapshot %s: cannot measure the space its store keeps: %s", rec.full_name, e)
            return out

        self.store_space.update(await asyncio.to_thread(measure))

    def space_bytes(self, rec: SnapshotRecord) -> int:
        """The pool space a snapshot reads from: its preserved chunks (shared ones included), or its clone file; for
        a snapshot its store keeps (RBD), what the store keeps for it alone as :meth:`measure_store_space` last
        found."""
        if rec.kind == "rbd":
            return self.store_space.get(rec.id, 0)
        if rec.kind == "clone":
            try:
                clone = os.stat(self._clone_path(rec)).st_blocks * 512
            except FileNotFoundError:
                clone = 0
            if rec.filled:
                return clone
        else:
            clone = 0
        vol = self.volumes.get(rec.lun_name)
        if vol is None or rec.lun_id is None or vol.lun_id != rec.lun_id:
            return clone
        return int(clone + vol.mapped_chunks(rec.epoch) * vol.chunk_size)

    async def _invalidate(self, lun_id: int, epochs: list[int], reason: str) -> None:
        """Called by a volume whose preservation failed, before it overwrites the origin: durable first. A snapshot
        whose record is still committing is waited for, so that it is marked invalid before that write too."""
        recording = self._recording
        if recording is not None and any((lun_id, e) in recording[0] for e in epochs):
            for e in epochs:
                self._early_invalid[(lun_id, e)] = reason
            await asyncio.shield(recording[1])
        try:
            await self._catalog_thread(self.cat.mark_invalid, lun_id, epochs, reason)
        except (CatalogError, sqlite3.Error, OSError) as exc:
            await self._keep_invalid(lun_id, epochs, reason, exc)
        for rec in self.cat.list_snapshots():
            if rec.lun_id == lun_id and rec.epoch in epochs:
                view = self.views.get(rec.id)
                if view is not None:
                    view.valid = False
                fill = self._fills.pop(rec.id, None)
                if fill is not None:
                    fill.cancel()
                log.error("snapshot %s is now invalid: %s", rec.full_name, reason)

    # --- reading a snapshot (exposure, resync) -----------------------------------------------------------------

    def open_view(self, rec: SnapshotRecord) -> BlockDevice:
        """A read-only BlockDevice of a snapshot: the filled clone's file, or the differential view."""
        rec = self.as_known(rec)
        if rec.state != "valid":
            from lunsync.snapshots.catalog import Invalid

            raise Invalid(f"snapshot {rec.full_name} is invalid ({rec.invalid_reason})")
        if rec.kind == "rbd":
            view = self.store_views.get(rec.id)
            if view is None:  # opening one is a round trip to the store: open_view_async does it in a thread
                raise NotReady(f"snapshot {rec.full_name} is not open")
            return view
        if rec.kind == "clone" and rec.filled:
            file = self.files.get(rec.id)
            if file is None:
                file = self.files[rec.id] = FileBackend.open(self._clone_path(rec), rec.block_size, thin=True,
                                                             read_only=True)
            return file
        vol = self.volumes.get(rec.lun_name)
        if vol is None or vol.lun_id != rec.lun_id:
            raise NotFound(f"the origin of {rec.full_name} is not open")
        if vol.pool_unavailable is not None:
            from lunsync.snapshots.catalog import Invalid

            raise Invalid(f"snapshot {rec.full_name} cannot be read: {vol.pool_unavailable}")
        view = self.views.get(rec.id)
        if view is None:
            view = self.views[rec.id] = vol.view(rec.epoch, rec.size_bytes // rec.block_size)
        return view

    async def open_view_async(self, rec: SnapshotRecord) -> BlockDevice:
        """:meth:`open_view`, opening a snapshot its LUN's store keeps (RBD) in a thread the first time."""
        if rec.kind != "rbd" or rec.id in self.store_views:
            return self.open_view(rec)
        st = self._store_of(rec.lun_name)
        if st is None:
            raise NotFound(f"the origin of {rec.full_name} is not open")
        view = await asyncio.to_thread(st.open_snapshot, rec.name)
        if rec.id in self.store_views:  # another reader opened it meanwhile: keep one
            await view.close()
        else:
            self.store_views[rec.id] = view
        return self.open_view(rec)

    async def _make_lu(self, rec: SnapshotRecord) -> LogicalUnit:
        from lunsync.provider.remote_snapshot import remote_view

        # Exposed on a target of this worker while another serves its LUN: read there, read-only here.
        remote = remote_view(self.array, rec)
        device = remote if remote is not None else await self.open_view_async(rec)
        return LogicalUnit(device, rec.identity, name=rec.full_name)

    async def expose(self, lun: str, name: str, target: str, number: int | None = None) -> SnapshotRecord:
        async with self._lock:
            rec = self.cat.expose(lun, name, target, number)
            try:
                assert rec.exposed_target is not None and rec.exposed_lun is not None
                lu = await self._make_lu(rec)
                self.exposures[rec.id] = Exposure(rec.id, rec.exposed_target, rec.exposed_lun, lu)
                self.array.build_target(rec.exposed_target)
            except BaseException:
                self.exposures.pop(rec.id, None)
                self.cat.unexpose(lun, name)
                raise
            log.info("snapshot %s exposed on %s as LUN %d (read-only, serial %s)", rec.full_name, rec.exposed_target,
                     rec.exposed_lun, rec.serial)
            return rec

    async def unexpose(self, lun: str, name: str) -> SnapshotRecord:
        async with self._lock:
            rec = self.cat.unexpose(lun, name)
            self.exposures.pop(rec.id, None)
            if rec.exposed_target is not None:
                self.array.build_target(rec.exposed_target)
            # A filled clone's file stays open for other readers until the snapshot is deleted.
            log.info("snapshot %s unexposed from %s (was LUN %s)", rec.full_name, rec.exposed_target, rec.exposed_lun)
            return rec

    # --- clones ----------------------------------------------------------------------------------------------------

    def fill_rate(self, rec: SnapshotRecord) -> tuple[float | None, float | None]:
        """A filling clone's rate (bytes per second of wall-clock time) and ETA in seconds, as far as measured."""
        window = self.fill_rates.get(rec.id)
        if window is None:
            return None, (0.0 if rec.filled else None)
        done_chunks, _ = self.fill_progress.get(rec.id, (rec.filled_chunks, rec.total_chunks))
        done, now = min(rec.size_bytes, done_chunks * rec.chunk_size_bytes), time.monotonic()
        return window.rate_bps(now, done), window.eta_s(now, done, rec.size_bytes)

    def _clone_path(self, rec: SnapshotRecord) -> str:
        return os.path.join(self._pool_by_id(rec.pool_id).path, f"clone-{rec.id}.img")

    def _start_fill(self, rec: SnapshotRecord) -> None:
        self.fill_progress[rec.id] = (rec.filled_chunks, rec.total_chunks)
        window = self.fill_rates[rec.id] = RateWindow()
        window.add(time.monotonic(), rec.filled_chunks * rec.chunk_size_bytes)
        self._fills[rec.id] = asyncio.get_running_loop().create_task(self._fill(rec), name=f"fill-{rec.full_name}")

    async def _fill(self, rec: SnapshotRecord) -> None:
        """Copy the snapshot into its clone file, chunk by chunk, committing progress after fdatasync."""
        path = self._clone_path(rec)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, rec.size_bytes)
            vol = self.volumes[rec.lun_name]
            cs, total, size = rec.chunk_size_bytes, rec.total_chunks, rec.size_bytes
            done = rec.filled_chunks
            last_commit = time.monotonic()
            # The fill reads the snapshot through its view's FileExtents: pool slots, holes, or what the origin
            # still holds.
            source = vol.view(rec.epoch, size // rec.block_size)
            bs = rec.block_size
            while done < total:
                stop = min(total, done + FILL_BATCH_CHUNKS)
                base = done * cs
                lba, blocks = base // bs, (min(stop * cs, size) - base) // bs
                extents = source.file_extents(lba, blocks)
                await asyncio.to_thread(_fill_pieces, extent_pieces(extents, base), fd)
                # A run taken from the origin is right unless it was overwritten meanwhile, and then its copy
                # exists now (preservation commits before the origin write): copy again what moved there.
                moved = moved_pieces(extents, source.file_extents(lba, blocks), base)
                if moved:
                    await asyncio.to_thread(_fill_pieces, moved, fd)
                done = stop
                self.fill_progress[rec.id] = (done, total)
                self.fill_rates[rec.id].add(time.monotonic(), done * cs)
                if time.monotonic() - last_commit >= FILL_COMMIT_INTERVAL_S or done == total:
                    await asyncio.to_thread(os.fdatasync, fd)
                    await asyncio.to_thread(self.cat.set_fill, rec.id, done, done == total)
                    last_commit = time.monotonic()
        except (StorageError, OSError, CatalogError) as e:
            log.error("clone %s: fill failed: %s", rec.full_name, e)
            origin = self.volumes.get(rec.lun_name)
            await self._invalidate(rec.lun_id or 0, [rec.epoch], f"clone fill failed: {e}")
            if origin is not None:
                await origin.hold()
                try:
                    await origin.drop_snapshot(rec.epoch)
                finally:
                    origin.release()
            return
        finally:
            os.close(fd)
            self._fills.pop(rec.id, None)
            self.fill_rates.pop(rec.id, None)
        log.info("clone %s filled (%d chunks); it no longer depends on %s", rec.full_name, total, rec.lun_name)
        # Independent now. First everything reading the clone switches to its own file: an exposure, and through the
        # view's redirect whoever else holds the view (a restore started while it filled). Only then does the origin
        # stop preserving for it and free the copies it alone needed.
        view = self.views.pop(rec.id, None)
        exp = self.exposures.get(rec.id)
        if view is not None or exp is not None:  # opened only for a reader: the file stays open until a delete
            file = self.open_view(self.cat.get_snapshot(rec.lun_name, rec.name))
            if view is not None:
                view.redirect = file
            if exp is not None:
                exp.lu.device = file
        await vol.hold()
        try:
            await vol.drop_snapshot(rec.epoch)
        finally:
            vol.release()


def _fill_pieces(pieces: list[tuple[int, int, int, int]], dst_fd: int) -> None:
    """Copy each (fd, source offset, length, clone offset) piece into the clone file; fd -1 pieces read as zeros."""
    for fd, off, length, dst in pieces:
        if fd < 0:
            zero_range(dst_fd, dst, length)
        else:
            copy_range(fd, dst_fd, length, off, dst)

"""The RBD backend: a LUN that is a Ceph RBD image, read and written through librbd's asynchronous calls.

This module owns :class:`RbdBackend` (the :class:`~lunsync.snapshots.device.BlockDevice` over one open image, with
the :class:`~lunsync.snapshots.device.ZeroWriter`, :class:`~lunsync.snapshots.device.MappingQuery` and
:class:`~lunsync.snapshots.device.StoreSnapshots` capabilities, the last through :mod:`lunsync.snapshots.rbdsnap`),
the cluster connections the images share (one ``rados.Rados`` per :class:`~lunsync.snapshots.model.CephConfig`,
counted by the images that use it and shut down with the last), and the image life cycle the control plane needs
(:func:`open_image` creates or attaches, :func:`image_size` and :func:`remove_image`). Every data-path call is a
librbd ``aio_*`` call whose completion, which librbd delivers on one of its own threads, resolves an asyncio future
through ``loop.call_soon_threadsafe``: nothing on the event loop waits for the cluster. What is blocking by nature
(connecting, opening, creating, resizing and closing an image, ``diff_iterate``) runs in the opener's thread or in
the backend's own worker thread. librbd's negative errno values become the storage error family through
:func:`lunsync.snapshots.fsutil.storage_error`, the one mapping, and its exceptions at open time become messages
that name the cluster, pool and image.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lunsync.snapshots.backend import BLOCK_SIZES, StoreBase, StoreSpec
from lunsync.snapshots.device import BlockDevice, Buffer, LbaExtent
from lunsync.snapshots.errors import NotReady, OutOfRange, ReadOnly, Saturated, StorageError
from lunsync.snapshots.fsutil import storage_error
from lunsync.snapshots.model import CephConfig, split_rbd_spec

try:  # Debian's python3-rados/python3-rbd (make ceph-bindings links them into the venv)
    import rados
    import rbd
except ImportError:  # pragma: no cover - a host without Ceph's bindings still serves file and block LUNs
    rados = None
    rbd = None

__all__ = ["RbdBackend", "create_image", "image_size", "open_image", "remove_image"]

_T = TypeVar("_T")

# Commands in flight on one image before the next is refused with TASK SET FULL: deep enough for every initiator's
# queue on a healthy cluster, bounded so a cluster that stopped answering cannot pile up requests without end.
INFLIGHT_LIMIT = 1024


def _bindings() -> None:
    if rados is None or rbd is None:
        raise StorageError("RBD LUNs need librados' and librbd's Python bindings (Debian: python3-rados python3-rbd)")


# --- cluster connections, shared by the images of one (conf, keyring, client) ------------------------------------


class _Cluster:
    """One connected ``rados.Rados`` and the pool contexts opened on it. Blocking; ``users`` is counted under
    ``_clusters_lock``, the pool contexts under the cluster's own lock (images open from several threads)."""

    def __init__(self, cfg: CephConfig) -> None:
        self.cfg = cfg
        self.users = 0
        self.ioctxs: dict[str, Any] = {}
        self._lock = threading.Lock()
        # Timeouts so that a cluster that is down, or a wrong address, is an error in seconds instead of a hang;
        # partial discards are not skipped, so an UNMAP of any range reads back zeros (LBPRZ).
        conf = {
            "rados_mon_op_timeout": str(cfg.connect_timeout_s),
            "client_mount_timeout": str(cfg.connect_timeout_s),
            "rados_osd_op_timeout": str(cfg.op_timeout_s),
            "rbd_skip_partial_discard": "false",
        }
        if cfg.keyring:
            conf["keyring"] = cfg.keyring
        if not os.path.exists(cfg.conf_path):
            raise NotReady(f"ceph: {cfg.conf_path} does not exist (set conf_path in the [ceph] section)")
        self.rados = rados.Rados(conffile=cfg.conf_path, name=cfg.client, conf=conf)
        try:
            self.rados.connect(timeout=cfg.connect_timeout_s)
        except rados.Error as exc:
            self.rados.shutdown()
            raise NotReady(f"cannot reach the Ceph cluster of {cfg.conf_path} as {cfg.client}: {exc}") from None

    def ioctx(self, pool: str) -> Any:
        with self._lock:
            return self._ioctx(pool)

    def _ioctx(self, pool: str) -> Any:
        ctx = self.ioctxs.get(pool)
        if ctx is None:
            try:
                ctx = self.rados.open_ioctx(pool)
            except rados.ObjectNotFound:
                raise StorageError(f"ceph: pool {pool!r} does not exist (create it with `ceph osd pool create "
                                   f"{pool}` and `rbd pool init {pool}`)") from None
            except rados.Error as exc:
                raise StorageError(f"ceph: cannot open pool {pool!r}: {exc}") from None
            self.ioctxs[pool] = ctx
        return ctx

    def shutdown(self) -> None:
        for ctx in self.ioctxs.values():
            ctx.close()
        self.ioctxs.clear()
        self.rados.shutdown()


_clusters: dict[CephConfig, _Cluster] = {}
_clusters_lock = threading.Lock()


def _acquire(cfg: CephConfig) -> _Cluster:
    _bindings()
    with _clusters_lock:
        cluster = _clusters.get(cfg)
        if cluster is None:
            cluster = _clusters[cfg] = _Cluster(cfg)
        cluster.users += 1
        return cluster


def _release(cluster: _Cluster) -> None:
    with _clusters_lock:
        cluster.users -= 1
        if cluster.users == 0 and _clusters.get(cluster.cfg) is cluster:
            del _clusters[cluster.cfg]
            cluster.shutdown()


def _with_pool(cfg: CephConfig | None, spec: str, fn: Callable[[Any, str], _T]) -> _T:
    """Run ``fn(ioctx, image)`` for ``POOL/IMAGE`` on a shared connection. Blocking."""
    pool, name = split_rbd_spec(spec)
    cluster = _acquire(cfg or CephConfig())
    try:
        return fn(cluster.ioctx(pool), name)
    finally:
        _release(cluster)


def image_size(cfg: CephConfig | None, spec: str) -> int:
    """The size in bytes of the image ``POOL/IMAGE``; :class:`NotReady` when there is none. Blocking."""

    def size(ioctx: Any, name: str) -> int:
        try:
            with rbd.Image(ioctx, name, read_only=True) as image:
                return int(image.size())
        except rbd.ImageNotFound:
            raise NotReady(f"rbd image {spec} does not exist (give a size to create it)") from None

    return _with_pool(cfg, spec, size)


def create_image(cfg: CephConfig | None, spec: str, size_bytes: int) -> None:
    """Create the image ``POOL/IMAGE``, ``size_bytes`` large; refused when an image of that name exists already, so
    that nothing but a new image is ever handed out as one. Blocking."""

    def create(ioctx: Any, name: str) -> None:
        try:
            rbd.RBD().create(ioctx, name, size_bytes, old_format=False)
        except rbd.ImageExists:
            raise StorageError(f"rbd image {spec} exists already (remove it, or choose another LUN name or pool)"
                               ) from None
        except rbd.Error as exc:
            raise StorageError(f"create rbd image {spec}: {exc}") from None

    _with_pool(cfg, spec, create)


def remove_image(cfg: CephConfig | None, spec: str) -> None:
    """Delete the image ``POOL/IMAGE``, which nothing may have open. Blocking."""

    def remove(ioctx: Any, name: str) -> None:
        try:
            rbd.RBD().remove(ioctx, name)
        except rbd.ImageNotFound:
            pass
        except rbd.ImageHasSnapshots:
            raise StorageError(f"rbd image {spec} has snapshots; it was kept (remove them with `rbd snap purge "
                               f"{spec}` and then the image with `rbd rm {spec}`)") from None
        except rbd.ImageBusy:
            raise StorageError(f"rbd image {spec} is open elsewhere (another gateway?); it was kept") from None

    _with_pool(cfg, spec, remove)


def open_image(spec: StoreSpec) -> RbdBackend:
    """The registry's opener for ``rbd``: open ``spec.path`` (``POOL/IMAGE``), read-only at ``spec.snapshot`` when
    one is named. A missing image is created ``spec.size_bytes`` large only when ``spec.create``; an existing one is
    served at its own size (the caller compares it with what it expected). Blocking."""
    if spec.block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, not {spec.block_size}")
    pool, name = split_rbd_spec(spec.path)
    cluster = _acquire(spec.ceph or CephConfig())
    try:
        ioctx = cluster.ioctx(pool)
        read_only = spec.read_only or spec.snapshot is not None
        try:
            image = rbd.Image(ioctx, name, snapshot=spec.snapshot, read_only=read_only)
        except rbd.ImageNotFound:
            if not spec.create or spec.snapshot is not None:
                at = f"@{spec.snapshot}" if spec.snapshot is not None else ""
                raise NotReady(f"rbd image {spec.path}{at} does not exist") from None
            if spec.size_bytes <= 0 or spec.size_bytes % spec.block_size:
                raise ValueError(f"size {spec.size_bytes} is not a positive multiple of the block size "
                                 f"{spec.block_size}") from None
            try:
                rbd.RBD().create(ioctx, name, spec.size_bytes, old_format=False)
            except rbd.ImageExists:
                pass  # made meanwhile by someone else: attach to it like any existing image
            image = rbd.Image(ioctx, name, read_only=read_only)
        try:
            size = int(image.size())
            if size < spec.block_size or size % spec.block_size:
                raise ValueError(f"rbd image {spec.path} holds {size} bytes, not a whole number of "
                                 f"{spec.block_size}-byte blocks")
        except BaseException:
            image.close()
            raise
    except rbd.Error as exc:
        _release(cluster)
        raise StorageError(f"rbd image {spec.path}: {exc}") from None
    except BaseException:
        _release(cluster)
        raise
    return RbdBackend(cluster, image, spec.path, spec.block_size, size // spec.block_size, read_only=read_only,
                      snapshot=spec.snapshot)


# --- the device --------------------------------------------------------------------------------------------------


class RbdBackend(StoreBase):
    """One open RBD image as a block device. Thin: UNMAP discards, deallocated objects read as zeros. The
    ``snapshot`` it was opened at, if any, makes it read-only; ``image`` is the open ``rbd.Image`` for the snapshot
    and resync engine (its snapshots, ``diff_iterate``, ``copy``), used from the backend's thread only."""

    def __init__(self, cluster: _Cluster, image: Any, spec: str, block_size: int, num_blocks: int, *,
                 read_only: bool, snapshot: str | None = None) -> None:
        super().__init__(block_size, num_blocks, read_only)
        self._cluster: _Cluster | None = cluster
        self.ceph = cluster.cfg
        self.image = image
        self.spec = spec
        self.path = spec  # what logs and the daemon's index of backing stores call it
        self.snapshot = snapshot
        self._closed = False
        self._inflight: set[asyncio.Future[Any]] = set()
        self._executor: ThreadPoolExecutor | None = None
        # A failed flush stays failed: librbd may have dropped what it could not write, so no later flush may
        # report success for writes that were lost.
        self._flush_error: StorageError | None = None

    # --- BlockDevice properties (geometry, read_only and the counters are StoreBase's; read-only at a snapshot) ---

    @property
    def thin(self) -> bool:
        """RBD images are always thin: UNMAP discards and GET LBA STATUS reports unallocated objects."""
        return True

    @property
    def flush_failed(self) -> bool:
        """True once a flush has failed (sticky, as for the file backend)."""
        return self._flush_error is not None

    # --- StoreSnapshots (lunsync.snapshots.device): the image's own snapshots, through lunsync.snapshots.rbdsnap ---
    # Blocking, on the caller's thread; rbdsnap is imported here because it needs librbd's bindings at import.

    def create_snapshot(self, name: str) -> None:
        """RBD snapshot ``lunsync.NAME`` of the image; librbd flushes its cache into it first."""
        from lunsync.snapshots import rbdsnap

        rbdsnap.create_snapshot(self.image, rbdsnap.snapshot_name(name))

    def remove_snapshot(self, name: str) -> bool:
        """Remove RBD snapshot ``lunsync.NAME`` (unprotected first) through the LUN's own handle, which holds the
        image's exclusive lock: no other handle has to ask for it."""
        from lunsync.snapshots import rbdsnap

        self._ioctx(split_rbd_spec(self.spec)[0])  # refused once closed
        return rbdsnap.remove_snapshot(self.image, rbdsnap.snapshot_name(name))

    def list_snapshots(self) -> list[str]:
        """The lunsync snapshots among the image's RBD snapshots (``lunsync.NAME``), by NAME."""
        from lunsync.snapshots import rbdsnap

        self._ioctx(split_rbd_spec(self.spec)[0])  # refused once closed
        return rbdsnap.lunsync_snapshots(self.image)

    def snapshot_space_bytes(self, name: str) -> int:
        """What the cluster keeps for ``lunsync.NAME`` alone (:func:`lunsync.snapshots.rbdsnap.held_bytes`)."""
        from lunsync.snapshots import rbdsnap

        pool, image = split_rbd_spec(self.spec)
        return rbdsnap.held_bytes(self._ioctx(pool), image, rbdsnap.snapshot_name(name))

    def open_snapshot(self, name: str) -> BlockDevice:
        """A read-only RbdBackend at ``lunsync.NAME``, whose changed regions are the head's diff against it."""
        from lunsync.snapshots import rbdsnap

        snap = rbdsnap.snapshot_name(name)
        view = open_image(StoreSpec(self.spec, self._num_blocks * self._block_size, self._block_size, snapshot=snap,
                                    ceph=self.ceph))
        pool, image = split_rbd_spec(self.spec)
        ioctx = self._ioctx(pool)
        return rbdsnap.ChangedSince(view, lambda: rbdsnap.changed_extents(ioctx, image, snap))

    def clone_snapshot(self, name: str, image: str) -> str:
        """Make ``image``, in this image's pool, an RBD clone of ``lunsync.NAME`` (protected first) and return its
        ``POOL/IMAGE``."""
        from lunsync.snapshots import rbdsnap

        pool, parent = split_rbd_spec(self.spec)
        ioctx = self._ioctx(pool)
        rbdsnap.clone_snapshot(ioctx, parent, rbdsnap.snapshot_name(name), ioctx, image)
        return f"{pool}/{image}"

    def flatten(self, progress: Callable[[int, int], bool] | None = None) -> bool:
        """Copy into this image (a clone) what it still reads from its parent snapshot, through the LUN's own handle,
        for as long as that takes; ``progress`` gets (objects done, objects in the image) and stops the copy by
        returning False (librbd's flatten then ends with ECANCELED, and a later one skips the objects already
        copied). True at once on an image that is no clone."""
        self._ioctx(split_rbd_spec(self.spec)[0])  # refused once closed

        def on_progress(done: int, total: int) -> int:  # on a librbd thread, with the GIL
            return 0 if progress is None or progress(done, total) else -errno.ECANCELED

        try:
            self.image.flatten(on_progress=on_progress)
        except rbd.InvalidArgument:
            return True  # no parent: nothing to copy
        except rbd.OperationCanceled:
            return False
        except rbd.Error as exc:
            raise StorageError(f"flatten rbd image {self.spec}: {exc}") from None
        return True

    def _ioctx(self, pool: str) -> Any:
        if self._cluster is None:
            raise NotReady(f"rbd image {self.spec} is closed")
        return self._cluster.ioctx(pool)

    # --- completions: librbd thread -> event loop ------------------------------------------------------------

    def _submit(self, what: str, lba: int | None, write: bool,
                start: Callable[[Callable[..., None]], object], *, closing: bool = False) -> asyncio.Future[Any]:
        """Start one aio call (``start(oncomplete)``) and return the future its completion resolves on this loop.
        The future's result is the call's data (a read's bytes) or None; a negative return value becomes the
        storage error for ``what`` at ``lba``. Refused once the device is closing, except for close's own flush."""
        if self._closed and not closing:
            raise NotReady(f"rbd image {self.spec} is closed")
        if len(self._inflight) >= INFLIGHT_LIMIT:
            raise Saturated(f"rbd image {self.spec}: {len(self._inflight)} commands wait on the cluster")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(ret: int, data: object) -> None:  # on the loop
            self._inflight.discard(fut)
            if fut.done():
                return  # the waiter was cancelled; the operation still ran to its end, which close() waited for
            if ret < 0:
                err = OSError(-ret, os.strerror(-ret))
                fut.set_exception(storage_error(err, f"{what} rbd image {self.spec}", lba, write=write))
            else:
                fut.set_result(data)

        def oncomplete(completion: Any, *data: object) -> None:  # on a librbd thread: touch nothing but the loop
            try:
                loop.call_soon_threadsafe(settle, completion.get_return_value(), data[0] if data else None)
            except RuntimeError:
                pass  # the loop is gone (interpreter shutdown); nobody waits for this any more

        self._inflight.add(fut)
        try:
            start(oncomplete)
        except BaseException:
            self._inflight.discard(fut)
            raise
        return fut

    async def _in_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        """Blocking librbd work (diff_iterate, resize, close) on the backend's own thread, so a stuck cluster
        holds that thread and not the loop's default pool."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"rbd-{self.spec}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _check_writable(self) -> None:
        if self._read_only:
            at = f" (snapshot {self.snapshot})" if self.snapshot is not None else ""
            raise ReadOnly(f"rbd image {self.spec}{at} is read-only")

    # --- data path --------------------------------------------------------------------------------------------

    async def read(self, lba: int, blocks: int) -> bytes:
        """Return ``blocks`` blocks from ``lba`` (librbd's ``bytes``, the caller's to keep). Unallocated objects
        read as zeros. Yields until the cluster answers."""
        self._check_range(lba, blocks)
        bs = self._block_size
        size = blocks * bs
        if not size:
            return b""
        data = await self._submit("read", lba, False,
                                  lambda done: self.image.aio_read(lba * bs, size, done))
        self.reads += 1
        self.read_bytes += size
        if data is None or len(data) != size:  # short only if the image shrank under us: pad as past-EOF zeros
            data = bytes(data or b"").ljust(size, b"\0")
        return bytes(data)

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        """Write whole blocks at ``lba``. Acknowledged by the OSDs (or librbd's cache, when ceph.conf enables it in
        write-back mode) on return; with ``fua`` a librbd flush that started after the write completed has
        returned too. Yields: two writes are ordered only if the second starts after the first returned."""
        self._check_writable()
        view = self._write_view(lba, data)
        # librbd takes bytes (not a view), and the buffer must stay as it is until the OSDs have it: an aborted
        # command's buffer returns to the connection, so a mutable one is copied.
        payload = data if isinstance(data, bytes) else view.tobytes()
        await self._submit("write", lba, True,
                           lambda done: self.image.aio_write(payload, lba * self._block_size, done))
        self.writes += 1
        self.write_bytes += view.nbytes
        if fua:
            await self._flush()

    async def write_zeroes(self, lba: int, blocks: int, fua: bool = False) -> None:
        """:class:`~lunsync.snapshots.device.ZeroWriter`: librbd's write-zeroes (whole objects are discarded, the
        rest zeroed in place). Durability as for :meth:`write`."""
        self._check_writable()
        self._check_range(lba, blocks)
        if blocks:
            bs = self._block_size
            await self._submit("write zeroes", lba, True,
                               lambda done: self.image.aio_write_zeroes(lba * bs, blocks * bs, done))
        if fua:
            await self._flush()

    async def flush(self) -> None:
        """Make every write that completed before this call durable (librbd's flush, which waits for its cache and
        the OSDs). A failed flush is reported by every later one too."""
        if self._closed:
            raise NotReady(f"rbd image {self.spec} is closed")
        if not self._read_only:
            await self._flush()

    async def _flush(self, *, closing: bool = False) -> None:
        if self._flush_error is not None:
            raise self._flush_error
        try:
            await self._submit("flush", None, True, lambda done: self.image.aio_flush(done), closing=closing)
        except StorageError as exc:
            self._flush_error = exc
            raise
        self.flushes += 1

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Discard each (lba, blocks) range; it reads back zeros (partial discards are zeroed, not skipped). Every
        range is checked before any is sent. Not durable until :meth:`flush`."""
        self._check_writable()
        for lba, blocks in ranges:
            self._check_range(lba, blocks)
        bs = self._block_size

        def discard(offset: int, length: int) -> Callable[[Callable[..., None]], object]:
            return lambda done: self.image.aio_discard(offset, length, done)

        futs = [self._submit("unmap", lba, True, discard(lba * bs, blocks * bs)) for lba, blocks in ranges if blocks]
        if futs:
            await asyncio.gather(*futs)

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        """Everything mapped: the image's allocation is only known by asking the cluster, which this synchronous
        call may not do; :meth:`query_lba_status` asks."""
        if max_extents < 1:
            raise ValueError("max_extents must be at least 1")
        if not 0 <= lba < self._num_blocks:
            raise OutOfRange(f"block {lba} outside 0..{self._num_blocks}")
        return [LbaExtent(lba, self._num_blocks - lba, True)]

    # How much of the image one query walks: GET LBA STATUS may describe less than the rest of the medium, and the
    # object map answers this much in one round trip.
    QUERY_SPAN_BYTES = 1 << 30

    async def query_lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        """:class:`~lunsync.snapshots.device.MappingQuery`: mapped and deallocated runs from ``lba`` over at most
        :attr:`QUERY_SPAN_BYTES`, from ``diff_iterate`` against nothing (the allocated extents; with fast-diff, from
        the object map). An extent is as fine as librbd reports it, at worst an object."""
        if max_extents < 1:
            raise ValueError("max_extents must be at least 1")
        if not 0 <= lba < self._num_blocks:
            raise OutOfRange(f"block {lba} outside 0..{self._num_blocks}")
        bs = self._block_size
        end = min(self._num_blocks, lba + max(1, self.QUERY_SPAN_BYTES // bs))
        runs = await self.allocated(lba, end - lba)
        out: list[LbaExtent] = []
        cur = lba
        for start, blocks in runs:
            if start > cur:
                out.append(LbaExtent(cur, start - cur, False))
            out.append(LbaExtent(start, blocks, True))
            cur = start + blocks
        if cur < end:
            out.append(LbaExtent(cur, end - cur, False))
        return out[:max_extents]

    async def allocated(self, lba: int, blocks: int, since: str | None = None) -> list[tuple[int, int]]:
        """The (lba, blocks) runs within the range that hold data, merged and clipped to it; with ``since`` (a
        snapshot of this image), the runs that changed after that snapshot was taken instead: what a restore onto
        this image from ``since`` has to copy. Asks the cluster (``diff_iterate``) from the backend's thread."""
        self._check_range(lba, blocks)
        if self._closed:
            raise NotReady(f"rbd image {self.spec} is closed")
        bs = self._block_size
        found: list[tuple[int, int]] = []

        def seen(offset: int, length: int, exists: bool) -> None:
            first = max(lba, offset // bs)
            stop = min(lba + blocks, -(-(offset + length) // bs))
            if stop <= first:
                return
            if found and found[-1][0] + found[-1][1] >= first:
                s, n = found[-1]
                found[-1] = (s, max(s + n, stop) - s)
            else:
                found.append((first, stop - first))

        def walk() -> None:
            whole_object = bool(self.image.features() & rbd.RBD_FEATURE_FAST_DIFF)
            self.image.diff_iterate(lba * bs, blocks * bs, since, seen, whole_object=whole_object)

        try:
            await self._in_thread(walk)
        except rbd.Error as exc:
            code = getattr(exc, "errno", None) or errno.EIO
            raise storage_error(OSError(code, str(exc)), f"diff rbd image {self.spec}", lba, write=False) from None
        return found

    async def allocated_regions(self, region_bytes: int) -> set[int] | None:
        """:class:`~lunsync.snapshots.device.AllocatedRegions`: the regions that :meth:`allocated` covers (an image
        read at a snapshot: its data then, its parent's included)."""
        from lunsync.snapshots import rbdsnap

        bs = self._block_size
        runs = await self.allocated(0, self._num_blocks)
        return rbdsnap.regions_of(((lba * bs, blocks * bs) for lba, blocks in runs), region_bytes)

    async def resize(self, num_blocks: int) -> None:
        """Grow (or shrink) the image to ``num_blocks``; librbd commits the new size to the cluster before it
        returns, so it is durable on return."""
        self._check_writable()
        if self._closed:
            raise NotReady(f"rbd image {self.spec} is closed")
        if num_blocks < 1:
            raise ValueError(f"cannot resize to {num_blocks} blocks")
        old = self._num_blocks
        if num_blocks < old:
            self._num_blocks = num_blocks  # refuse writes to the doomed tail while librbd cuts it
        try:
            await self._in_thread(self.image.resize, num_blocks * self._block_size)
        except rbd.Error as exc:
            self._num_blocks = old
            code = getattr(exc, "errno", None) or errno.EIO
            raise storage_error(OSError(code, str(exc)), f"resize rbd image {self.spec}", None, write=True) from None
        self._num_blocks = num_blocks

    async def close(self) -> None:
        """Refuse new I/O, wait for what is in flight, flush (unless read-only or already failed), close the image
        and let go of the cluster connection. Idempotent; a cancelled caller does not abort it."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        # Refuse new I/O, wait for what is in flight, flush (unless read-only or already failed), close the image
        # and let go of the cluster connection.
        self._closed = True  # refuse new I/O; what is already in flight finishes below
        try:
            if self._inflight:
                await asyncio.wait(list(self._inflight))
            if not self._read_only and self._flush_error is None:
                await self._flush(closing=True)
        finally:
            cluster, self._cluster = self._cluster, None
            if cluster is not None:
                try:
                    await self._in_thread(self.image.close)
                finally:
                    await self._in_thread(_release, cluster)
            if self._executor is not None:
                self._executor.shutdown(wait=False)

"""The backing stores: where a LUN's bytes live on the host.

This module owns the two concrete :class:`~lunsync.snapshots.device.BlockDevice` implementations, a LUN kept in a
regular (sparse or fully allocated) file and a LUN on a raw block device, and the registry of backends by name
(``file``, ``block``, and ``rbd`` from :mod:`lunsync.snapshots.rbd`; :func:`register_backend`), through which
:func:`open_store` opens the store a LUN's configuration names. Its OSErrors become the storage error family through :mod:`lunsync.snapshots.fsutil`, the one
mapping. The hot path stays on the event loop while the page cache can serve it: reads try ``preadv(RWF_NOWAIT)``
inline and only go to a thread on a cache miss, writes are ``pwritev`` into the page cache, and everything that
waits for a disk (fdatasync, hole punching, allocation, resize) runs on the backend's own I/O threads.

A stuck store stays its LUN's problem. Each backend owns a small pool of I/O threads (tgt's backing-store threads), so a
LUN whose storage hangs holds its own threads and never the ones other LUNs flush on. Its writes go to those threads too
when its file system is one whose page-cache writes may wait on a server or a user-space process (FUSE, NFS, SMB, Ceph:
:func:`~lunsync.snapshots.fsutil.may_hang`), and for a while after an inline write stalled the loop (more than
``STALL_S``); elsewhere they stay inline, where they cost no thread hop. Reads of stores without RWF_NOWAIT go to the
threads as well. When ``IO_QUEUE_LIMIT`` commands are on one backend's threads, the next ones wait for a place in
arrival order; once none of them finished for ``QUEUE_WAIT_S`` the waiting ones are refused with
:class:`~lunsync.snapshots.errors.Saturated` (TASK SET FULL), so a stuck LUN's queue cannot grow without bound, while a
slow one (its writes here after a stall, under load) is never refused. This state belongs to the backend, so it moves
with the LUN. Each backend keeps plain integer counters that a metrics collector samples; nothing here talks to
Prometheus.

This module is compiled with mypyc (setup.py) along with the SCSI layer: a plain WRITE reaches ``pwritev`` through
:meth:`write_inline` with no coroutine, and the RBD backend, which stays interpreted, subclasses :class:`StoreBase`.

Read buffers: every :meth:`read` returns a fresh ``bytearray`` that the caller owns outright. The backend keeps no
reference to it and never reuses it, so it stays valid for as long as the caller holds it and may be mutated freely.
A microbenchmark of a free-list pool against a fresh ``bytearray`` per read (page-cache hits, this 2-core box) showed
the pool saving about 0.2 us of 2.4 us at 4 KiB and 2-5 us of ~20 us at 128 KiB: a few percent of a request that also
crosses the network, which does not pay for a release() rule that every layer above (volume, snapshot, resync, the
PDU writer) would have to honour, and a use-after-release bug would serve one initiator another's data.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from lunsync.snapshots import fsutil
from lunsync.snapshots.device import BlockDevice, Buffer, FileExtent, LbaExtent
from lunsync.snapshots.errors import NotReady, OutOfRange, ReadOnly, Saturated, StorageError
from lunsync.snapshots.fsutil import may_hang, open_error, pread_full, pwrite_full, storage_error
from lunsync.snapshots.model import CephConfig

__all__ = [
    "BlockDevBackend",
    "FileBackend",
    "Opener",
    "StoreBase",
    "StoreSpec",
    "UnavailableStore",
    "Unsupported",
    "open_store",
    "register_backend",
    "registered_backends",
]

_T = TypeVar("_T")

BLOCK_SIZES = (512, 4096)

log = logging.getLogger("lunsync.backend")

IO_THREADS = 4  # per backend, started on first use
IO_QUEUE_LIMIT = 64  # commands on one backend's threads; the next ones wait for a place
QUEUE_WAIT_S = 2.0  # a waiting command is refused (TASK SET FULL) when no job finished on the threads for this long
STALL_S = 0.05  # an inline write this slow held the event loop: the LUN's writes go to its threads for a while
STALL_HOLD_S = 30.0
# Read twice per inline write: a module global costs the compiled build a dict lookup, ``time.monotonic`` an attribute
# lookup on the module that costs about five times as much.
_monotonic: Final = time.monotonic

# <linux/fs.h>: BLKZEROOUT = _IO(0x12, 127), argument is uint64_t[2] = {start, length} in bytes.
_BLKZEROOUT = 0x127F


class Unsupported(StorageError):
    """The backing store cannot do this at all (resizing a raw block device)."""


def _check_geometry(size_bytes: int, block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, not {block_size}")
    if size_bytes <= 0 or size_bytes % block_size:
        raise ValueError(f"size {size_bytes} is not a positive multiple of the block size {block_size}")


def _no_mypyc_attr(**_: object) -> Callable[[type[_T]], type[_T]]:
    return lambda cls: cls


try:
    from mypy_extensions import mypyc_attr
except ImportError:  # an install without mypy: the decorator only tells mypyc something, and a no-op does as well
    mypyc_attr = _no_mypyc_attr  # type: ignore[assignment]


@mypyc_attr(allow_interpreted_subclasses=True)  # the RBD backend (lunsync.snapshots.rbd) is not compiled
class StoreBase:
    """What every backend shares (file, block device, RBD image): its geometry, the read-only flag, the range check,
    and the plain integer counters a metrics collector samples (ints because the hot path must not call into
    Prometheus)."""

    def __init__(self, block_size: int, num_blocks: int, read_only: bool) -> None:
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._read_only = read_only
        self.reads = 0
        self.writes = 0
        self.read_bytes = 0
        self.write_bytes = 0
        self.flushes = 0
        self._close_task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """Flush (unless read-only) and release the store; see each backend's ``_close``.

        Idempotent, and safe to call concurrently: every caller waits for the one close, which a cancelled caller
        does not abort.
        """
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        raise NotImplementedError

    @property
    def block_size(self) -> int:
        """Logical block size in bytes (512 or 4096)."""
        return self._block_size

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks."""
        return self._num_blocks

    @property
    def read_only(self) -> bool:
        """True when the store was opened read-only; every write is refused before it reaches the store."""
        return self._read_only

    def _check_range(self, lba: int, blocks: int) -> None:
        if lba < 0 or blocks < 0 or lba + blocks > self._num_blocks:
            raise OutOfRange(f"blocks {lba}+{blocks} outside 0..{self._num_blocks}")

    def _write_view(self, lba: int, data: Buffer) -> memoryview:
        """``data`` as flat bytes, checked to be whole blocks that fit at ``lba``."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes % self._block_size:
            raise ValueError(f"write of {view.nbytes} bytes is not a whole number of {self._block_size}-byte blocks")
        self._check_range(lba, view.nbytes // self._block_size)
        return view


class _FdBackend(StoreBase):
    """What the file and block-device backends share: one descriptor, the I/O paths and flushing."""

    def __init__(self, path: str, fd: int, block_size: int, num_blocks: int, *, thin: bool, read_only: bool) -> None:
        super().__init__(block_size, num_blocks, read_only)
        self.path = path
        self._fd = fd
        self._thin = thin
        self._closed = False
        # RWF_NOWAIT lets a page-cache hit stay on the loop and turns a miss into EAGAIN instead of a stall. A file
        # or device that does not support it answers EOPNOTSUPP once, and reads then block inline as before.
        self._nowait = os.RWF_NOWAIT
        # The LUN's own I/O threads (see the module docstring), and whether its writes go there.
        self._executor: ThreadPoolExecutor | None = None
        self._queued = 0  # commands on the threads (running or queued in the executor), at most IO_QUEUE_LIMIT
        self._room_waiters: deque[asyncio.Future[None]] = deque()  # commands waiting for one of those places
        self._finished = 0  # jobs the threads finished (any outcome); written on the threads
        self._offload_writes = may_hang(fd)
        self._inline_after = 0.0  # monotonic time after which a stalled LUN writes inline again
        # Flush coalescing: ``_flush_waiting`` is the future of the next fdatasync, which has not started yet; every
        # flush requested now joins it. The runner detaches it just before calling fdatasync, so whoever asks later
        # gets a fresh one and is never satisfied by a sync that began before their request.
        self._flush_waiting: asyncio.Future[None] | None = None
        self._flush_runner: asyncio.Task[None] | None = None
        # After a failed fdatasync the kernel may already have dropped the dirty pages and will report success next
        # time (the "fsyncgate" lesson), so the failure is kept and every later flush reports it.
        self._flush_error: OSError | None = None
        # Executor jobs that use the descriptor; close() waits for them so the fd number is never reused under them.
        self._jobs: set[asyncio.Future[Any]] = set()

    # --- BlockDevice properties -------------------------------------------------------------------------------

    @property
    def thin(self) -> bool:
        """True when UNMAP deallocates and GET LBA STATUS reports holes."""
        return self._thin

    def fileno(self) -> int:
        """The open descriptor, for the copy-on-write engine that keeps this store's snapshots. Owned by the
        backend: do not close."""
        return self._live_fd()

    # --- capabilities (lunsync.snapshots.device) ------------------------------------------------------------------

    def file_extents(self, lba: int, blocks: int) -> list[FileExtent]:
        """:class:`~lunsync.snapshots.device.FileExtents`: one run in this store's file, split where a thin store
        has holes (they read as zeros, and a copier punches them rather than copying zeros)."""
        fd = self._live_fd()
        self._check_range(lba, blocks)
        bs = self._block_size
        if not self._thin or not blocks:
            return [(fd, lba * bs, blocks * bs)]
        out: list[FileExtent] = []
        cur, end = lba, lba + blocks
        while cur < end:
            for ext in self.lba_status(cur, 64):
                stop = min(ext.lba + ext.blocks, end)
                out.append((fd if ext.mapped else -1, cur * bs, (stop - cur) * bs))
                cur = stop
                if cur >= end:
                    break
        return out

    async def begin_copy(self, lba: int, blocks: int) -> int:
        """:class:`~lunsync.snapshots.device.CopyTarget`: this store's descriptor, after the checks a write makes."""
        fd = self._live_fd()
        self._check_writable()
        self._check_range(lba, blocks)
        return fd

    # --- helpers ----------------------------------------------------------------------------------------------

    def _live_fd(self) -> int:
        if self._closed:
            raise NotReady(f"{self.path}: backing store is closed")
        return self._fd

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnly(f"{self.path} is read-only")

    async def _in_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run blocking work on the descriptor in the executor.

        The executor future is shielded and tracked: a cancelled caller stops waiting, but the job runs to the end
        and close() still waits for it before the descriptor is released.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix=f"io-{os.path.basename(self.path)}")
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self._run_job, fn, *args)
        self._jobs.add(fut)
        fut.add_done_callback(self._job_done)
        return await asyncio.shield(fut)

    def _run_job(self, fn: Callable[..., _T], *args: object) -> _T:
        # On an I/O thread. The count is what tells a slow store from a stuck one (see _room); it is kept here, not in
        # a loop callback, so that a loop that fell behind (the very reason writes came here) still sees it move.
        try:
            return fn(*args)
        finally:
            self._finished += 1

    async def _queued_io(self, fn: Callable[..., _T], *args: object) -> _T:
        """A read or write on the LUN's threads. Past IO_QUEUE_LIMIT it waits its turn, and is refused only when
        none of the commands on the threads finished for QUEUE_WAIT_S (the store is stuck)."""
        if self._queued >= IO_QUEUE_LIMIT or self._room_waiters:
            await self._room()  # the place of a command that finished is handed to this one
            if self._closed:
                self._release()
                self._live_fd()
        else:
            self._queued += 1
        try:
            return await self._in_thread(fn, *args)
        finally:
            self._release()

    async def _room(self) -> None:
        """Wait, in arrival order, until a command on the threads finishes and hands its place over. A slow store
        (writes sent here after a stall, a busy NFS server) only makes the command wait: answering TASK SET FULL to
        a store that keeps finishing work made initiators give up on writes after their few retries. Refused with
        Saturated once no job finished on the threads for QUEUE_WAIT_S."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append(fut)
        try:
            while not fut.done():
                finished = self._finished
                await asyncio.wait((fut,), timeout=QUEUE_WAIT_S)
                if not fut.done() and self._finished == finished:
                    raise Saturated(f"{self.path}: {self._queued} commands wait on its storage, none finished in "
                                    f"{QUEUE_WAIT_S:g} s")
        except BaseException:
            if fut.done():
                self._release()  # handed a place just as it gave up (cancelled): pass it on
            else:
                self._room_waiters.remove(fut)
            raise

    def _release(self) -> None:
        """A command leaves the threads' queue: its place goes to the first command waiting for one, if any."""
        waiters = self._room_waiters
        if waiters:
            waiters.popleft().set_result(None)
        else:
            self._queued -= 1

    def _job_done(self, fut: asyncio.Future[Any]) -> None:
        self._jobs.discard(fut)
        if not fut.cancelled():
            fut.exception()  # marks it retrieved when its only waiter was cancelled; the waiter saw it otherwise

    # --- data path --------------------------------------------------------------------------------------------

    async def read(self, lba: int, blocks: int) -> bytearray:
        """Return ``blocks`` blocks from ``lba`` in a new ``bytearray`` the caller owns. Holes and EOF read as zeros.

        Served inline when the page cache holds the range; a miss (or a partial hit) finishes in the executor.
        """
        # Once per READ command: the checks inlined, their methods called only to raise (see write).
        if self._closed:
            self._live_fd()
        if lba < 0 or blocks < 0 or lba + blocks > self._num_blocks:
            self._check_range(lba, blocks)
        fd = self._fd
        bs = self._block_size
        size = blocks * bs
        offset = lba * bs
        buf = bytearray(size)  # zero-filled, so a short read at EOF already reads as zeros
        got = 0
        try:
            if self._nowait:
                try:
                    got = os.preadv(fd, [buf], offset, self._nowait)
                except BlockingIOError:
                    got = 0
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
                    self._nowait = 0
            if got < size:  # a miss, or a store that cannot say whether it would block: never on the loop
                await self._queued_io(pread_full, fd, memoryview(buf)[got:], offset + got)
        except OSError as exc:
            raise storage_error(exc, f"read {self.path} at block {lba}", lba, write=False) from exc
        self.reads += 1
        self.read_bytes += size
        return buf

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        """Write whole blocks at ``lba``.

        Without ``fua`` the data is in the page cache when this returns; with ``fua`` an fdatasync that started after
        the write completed has returned.
        """
        if not self.write_inline(lba, data):
            if self._closed or self._read_only:
                self._live_fd()
                self._check_writable()
            view = self._write_view(lba, data)  # flat bytes, checked: raises what is wrong with them
            try:
                await self._offloaded_write(self._fd, view, lba)
            except OSError as exc:
                raise storage_error(exc, f"write {self.path} at block {lba}", lba, write=True) from exc
            self.writes += 1
            self.write_bytes += view.nbytes
        if fua:
            await self._flush()

    def write_inline(self, lba: int, data: Buffer) -> bool:
        """:class:`~lunsync.snapshots.device.InlineWrite`: ``pwritev`` into the page cache, unless this store's
        writes go to its threads now (False) or the store is closed or read-only (False: :meth:`write` raises)."""
        # Once per WRITE command: the checks are inlined, with the methods called only to raise, and bytes or a
        # bytearray (what the SCSI layer hands down) goes to pwritev as it is.
        if self._closed or self._read_only or self._offload_writes or self._inline_after:
            return False
        fd = self._fd
        bs = self._block_size
        if isinstance(data, (bytes, bytearray)) and not len(data) % bs and 0 <= lba \
                and lba + len(data) // bs <= self._num_blocks:
            nbytes = len(data)
        else:
            data = self._write_view(lba, data)  # flat bytes, checked: raises what is wrong with them
            nbytes = data.nbytes
        offset = lba * bs
        try:
            started = _monotonic()
            done = os.pwritev(fd, [data], offset)
            if done != nbytes:  # short (a signal, a quota edge): the rest must still land or fail
                pwrite_full(fd, memoryview(data)[done:], offset + done)
            stalled = _monotonic() - started
        except OSError as exc:
            raise storage_error(exc, f"write {self.path} at block {lba}", lba, write=True) from exc
        if stalled > STALL_S:
            self._inline_after = time.monotonic() + STALL_HOLD_S
            log.warning("%s: a write held the event loop %.0f ms; its writes go to its own threads for %g s",
                        self.path, stalled * 1e3, STALL_HOLD_S)
        self.writes += 1
        self.write_bytes += nbytes
        return True

    async def _offloaded_write(self, fd: int, view: memoryview, lba: int) -> None:
        if self._inline_after and time.monotonic() > self._inline_after:
            self._inline_after = 0.0
        # A copy: an aborted command's buffer goes back to the connection while the thread may still be writing.
        await self._queued_io(pwrite_full, fd, bytes(view), lba * self._block_size)

    async def flush(self) -> None:
        """Make every write completed before this call durable (fdatasync); concurrent flushes share one sync."""
        self._live_fd()
        if not self._read_only:
            await self._flush()

    async def _flush(self) -> None:
        waiting = self._flush_waiting
        if waiting is None:
            loop = asyncio.get_running_loop()
            waiting = self._flush_waiting = loop.create_future()
            if self._flush_runner is None or self._flush_runner.done():
                self._flush_runner = loop.create_task(self._run_flushes())
        # Shielded so that one cancelled waiter does not cancel the sync the others are waiting for.
        await asyncio.shield(waiting)

    @property
    def flush_failed(self) -> bool:
        """Whether an fdatasync has failed: then every later flush fails too (sticky), until the LUN is reopened."""
        return self._flush_error is not None

    def _flush_failure(self) -> StorageError:
        assert self._flush_error is not None
        return storage_error(
            self._flush_error, f"fdatasync {self.path} (sticky: writes before it may be lost)", None, write=True
        )

    def _take_waiting(self) -> asyncio.Future[None] | None:
        # A method, not the attribute read inline: after an inline ``self._flush_waiting = None`` mypy narrows the
        # attribute to None for the rest of the function, across the await in which a new flush request sets it
        # again, and mypyc compiles that narrowing into a type check that fails.
        waiting, self._flush_waiting = self._flush_waiting, None
        return waiting

    async def _run_flushes(self) -> None:
        # Each round detaches the waiting future: from then on, new requests need the next sync.
        while (waiting := self._take_waiting()) is not None:
            try:
                if self._flush_error is None:
                    # os.fdatasync is looked up per call so tests can record its order against pwritev.
                    await self._in_thread(os.fdatasync, self._fd)
                    self.flushes += 1
            except OSError as exc:
                self._flush_error = exc
            except BaseException:
                # The runner itself was cancelled (loop shutdown): release every waiter, including those queued for
                # the next sync, so none hangs on a future nobody will complete.
                waiting.cancel()
                later = self._take_waiting()
                if later is not None:
                    later.cancel()
                raise
            if self._flush_error is not None:
                waiting.set_exception(self._flush_failure())
                waiting.exception()  # every waiter re-raises it; do not warn when all of them were cancelled
            else:
                waiting.set_result(None)

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Deallocate each (lba, blocks) range; afterwards it reads as zeros. Not durable until flush.

        Every range is checked before any is touched, so an out-of-range list changes nothing.
        """
        fd = self._live_fd()
        self._check_writable()
        for lba, blocks in ranges:
            self._check_range(lba, blocks)
        spans = [(lba * self._block_size, blocks * self._block_size) for lba, blocks in ranges if blocks]
        if not spans:
            return
        first = ranges[0][0]
        try:
            await self._in_thread(self._unmap_spans, fd, spans)
        except OSError as exc:
            raise storage_error(exc, f"unmap {self.path} from block {first}", first, write=True) from exc

    def _unmap_spans(self, fd: int, spans: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        """Describe mapped and deallocated runs from ``lba``, at most ``max_extents`` of them. No I/O wait."""
        fd = self._live_fd()
        if max_extents < 1:
            raise ValueError("max_extents must be at least 1")
        if not 0 <= lba < self._num_blocks:
            raise OutOfRange(f"block {lba} outside 0..{self._num_blocks}")
        return self._extents(fd, lba, max_extents)

    def _extents(self, fd: int, lba: int, max_extents: int) -> list[LbaExtent]:
        # A fully provisioned store (thick file, raw device) is mapped everywhere.
        return [LbaExtent(lba, self._num_blocks - lba, True)]

    async def resize(self, num_blocks: int) -> None:
        """Change the capacity to ``num_blocks``; durable on return."""
        raise NotImplementedError

    async def _close(self) -> None:
        # Flush (unless read-only), wait for executor jobs on the descriptor, then close it.
        self._closed = True  # refuse new I/O; what is already in flight finishes below
        try:
            if not self._read_only and self._flush_error is None:
                await self._flush()
        finally:
            # A flush or job still running keeps the descriptor until it ends, so its number is never reused early.
            if self._flush_runner is not None:
                await asyncio.wait([self._flush_runner])
            while self._jobs:
                await asyncio.wait(list(self._jobs))
            os.close(self._fd)
            if self._executor is not None:
                self._executor.shutdown(wait=False)


class FileBackend(_FdBackend):
    """A LUN kept in a regular file: sparse when thin (holes are unmapped blocks), fully allocated when thick."""

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        size_bytes: int,
        block_size: int = 512,
        thin: bool = True,
        read_only: bool = False,
        *,
        overwrite: bool = False,
    ) -> FileBackend:
        """Create the backing file and open it. Blocking: the daemon calls it from a thread.

        Thin files are sized with ftruncate and hold no blocks; thick ones are allocated with posix_fallocate. The
        file and its directory entry are durable on return; a half-made file is removed on failure. An existing file
        is an error unless ``overwrite``. Files are created 0600: a LUN holds someone's disk.
        """
        _check_geometry(size_bytes, block_size)
        name = os.fspath(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(name, flags, 0o600)
        except FileExistsError as exc:
            raise StorageError(f"{name} already exists; pass overwrite=True to replace it") from exc
        except OSError as exc:
            raise open_error(exc, name) from exc
        try:
            try:
                os.ftruncate(fd, size_bytes)
                if not thin:
                    os.posix_fallocate(fd, 0, size_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsutil.fsync_dir(os.path.dirname(os.path.abspath(name)))
        except OSError as exc:
            try:
                os.unlink(name)
            except OSError:
                pass  # the original error is the one worth reporting
            raise open_error(exc, name) from exc
        return cls.open(name, block_size, thin, read_only)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], block_size: int = 512, thin: bool = True, read_only: bool = False
    ) -> FileBackend:
        """Open an existing backing file whose size is a multiple of ``block_size``."""
        name = os.fspath(path)
        try:
            fd = os.open(name, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as exc:
            raise open_error(exc, name) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{name} is not a regular file (a block device is a LUN with backend 'block')")
            _check_geometry(st.st_size, block_size)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, block_size, st.st_size // block_size, thin=thin, read_only=read_only)

    def _unmap_spans(self, fd: int, spans: list[tuple[int, int]]) -> None:
        # A thin file punches holes (blocks return to the filesystem); a thick one converts the range to allocated
        # zeros so that it never needs space again. Both read back as zeros, which is what LBPRZ promises.
        for offset, length in spans:
            fsutil.zero_range(fd, offset, length, deallocate=self._thin)

    def _extents(self, fd: int, lba: int, max_extents: int) -> list[LbaExtent]:
        # SEEK_DATA/SEEK_HOLE on a thin file. A block only partly backed by data counts as mapped, so "deallocated"
        # is always safe to trust. A thick file keeps the base answer, all mapped: its never-written extents are
        # still reserved even though SEEK_DATA may call them holes.
        if not self._thin:
            return super()._extents(fd, lba, max_extents)
        bs = self._block_size
        end = self._num_blocks
        extents: list[LbaExtent] = []

        def add(start: int, stop: int, mapped: bool) -> None:
            # Rounding partial blocks to mapped can make two mapped runs touch; report them as one.
            if extents and extents[-1].mapped == mapped:
                extents[-1] = LbaExtent(extents[-1].lba, stop - extents[-1].lba, mapped)
            else:
                extents.append(LbaExtent(start, stop - start, mapped))

        cur = lba
        try:
            while cur < end and len(extents) < max_extents:
                try:
                    data = os.lseek(fd, cur * bs, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end * bs  # ENXIO: nothing but hole up to EOF
                first_mapped = min(data // bs, end)
                if first_mapped > cur:
                    add(cur, first_mapped, False)
                    cur = first_mapped
                    if cur >= end or len(extents) >= max_extents:
                        break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                stop = min(-(-hole // bs), end)
                add(cur, stop, True)
                cur = stop
        except OSError as exc:
            raise storage_error(exc, f"lba status {self.path} at block {cur}", cur, write=False) from exc
        return extents

    async def resize(self, num_blocks: int) -> None:
        """Grow or shrink the file to ``num_blocks``; a thick file gets its new part allocated. Durable on return."""
        fd = self._live_fd()
        self._check_writable()
        if num_blocks < 1:
            raise ValueError(f"cannot resize to {num_blocks} blocks")
        old = self._num_blocks
        if num_blocks < old:
            # Shrink the visible size first: a write landing in the doomed tail during the truncate would otherwise
            # extend the file again.
            self._num_blocks = num_blocks
        try:
            await self._in_thread(self._resize_file, fd, old * self._block_size, num_blocks * self._block_size)
        except OSError as exc:
            # Expose what the file really holds now, never more than before.
            try:
                self._num_blocks = min(old, os.fstat(fd).st_size // self._block_size)
            except OSError:
                self._num_blocks = min(old, num_blocks)
            raise storage_error(exc, f"resize {self.path} to {num_blocks} blocks", None, write=True) from exc
        self._num_blocks = num_blocks

    def _resize_file(self, fd: int, old_size: int, new_size: int) -> None:
        os.ftruncate(fd, new_size)
        if not self._thin and new_size > old_size:
            try:
                os.posix_fallocate(fd, old_size, new_size - old_size)
            except OSError:
                os.ftruncate(fd, old_size)  # a thick file must not end up with an unreserved tail
                raise
        os.fsync(fd)  # fsync, not fdatasync: the new size is metadata


class BlockDevBackend(_FdBackend):
    """A LUN on a raw block device. Capacity is the device's; every block counts as mapped."""

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], block_size: int = 512, thin: bool = True, read_only: bool = False
    ) -> BlockDevBackend:
        """Open the device exclusively (O_EXCL on a block device fails with EBUSY while it is mounted or claimed).

        A device whose size is not a multiple of ``block_size`` exposes the whole blocks and leaves the tail unused.
        """
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, not {block_size}")
        name = os.fspath(path)
        try:
            fd = os.open(name, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            raise open_error(exc, name) from exc
        try:
            if not stat.S_ISBLK(os.fstat(fd).st_mode):
                raise ValueError(f"{name} is not a block device")
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < block_size:
                raise ValueError(f"{name} is smaller than one {block_size}-byte block")
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, block_size, size // block_size, thin=thin, read_only=read_only)

    def _unmap_spans(self, fd: int, spans: list[tuple[int, int]]) -> None:
        # fallocate(PUNCH_HOLE) on a block device is the kernel's "discard that reads back zeros" (write-zeroes with
        # unmap allowed, never falling back to writing). BLKDISCARD is not used: since Linux 4.12 no device promises
        # zeros after a discard, and the protocol promises LBPRZ. Where the device cannot unmap-and-zero, BLKZEROOUT
        # writes zeros so the data contract still holds, at the cost of keeping the blocks allocated.
        for offset, length in spans:
            if not fsutil.punch(fd, offset, length):
                fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("=QQ", offset, length))

    async def resize(self, num_blocks: int) -> None:
        """Refused: a raw device's size is set by whoever provides it (LVM, the SAN), not by the target."""
        self._live_fd()
        raise Unsupported(f"{self.path} is a block device; resize it at its source and reopen")


class UnavailableStore:
    """Stands in for a store that could not be opened (an RBD image whose cluster is unreachable at start), so the
    LUN keeps its number and identity and answers every data command with NOT READY, while the daemon serves its
    other LUNs and keeps trying to open this one. Holds nothing and touches nothing."""

    thin = True

    def __init__(self, what: str, block_size: int, num_blocks: int, reason: str) -> None:
        self.what, self.reason = what, reason
        self.block_size, self.num_blocks = block_size, num_blocks
        self.read_only = False

    def _refuse(self) -> NotReady:
        return NotReady(f"{self.what} is not available: {self.reason}")

    async def read(self, lba: int, blocks: int) -> bytes:
        raise self._refuse()

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        raise self._refuse()

    async def flush(self) -> None:
        raise self._refuse()

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        raise self._refuse()

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        raise self._refuse()

    async def resize(self, num_blocks: int) -> None:
        raise self._refuse()

    async def close(self) -> None:
        return None


# --- the registry: backends by the name a LUN's configuration gives ----------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """What a backend needs to open (or create) one LUN's store: the catalog's record, resolved. ``path`` is
    absolute for the ``file`` and ``block`` backends and ``POOL/IMAGE`` for ``rbd``, which also takes the cluster to
    reach (``ceph``), may open the image read-only at one of its snapshots (``snapshot``), and creates a missing
    image only when ``create`` says so (``lun create``), never when a daemon merely reopens its LUNs."""

    path: str
    size_bytes: int
    block_size: int = 512
    thin: bool = True
    read_only: bool = False
    ceph: CephConfig | None = None
    snapshot: str | None = None
    create: bool = False


# Opens the store a spec describes, creating it when the backend owns creation (a missing LUN file). Blocking (it may
# allocate a thick file, or talk to a cluster): the daemon calls it from a thread.
Opener = Callable[[StoreSpec], BlockDevice]
_BACKENDS: dict[str, Opener] = {}


def register_backend(name: str, opener: Opener) -> None:
    """Make ``name`` (a name in :data:`lunsync.snapshots.model.BACKENDS`) open stores with ``opener``."""
    if name in _BACKENDS:
        raise ValueError(f"backend {name!r} is already registered")
    _BACKENDS[name] = opener


def registered_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def open_store(backend: str, spec: StoreSpec) -> BlockDevice:
    """Open ``spec`` with the backend its LUN's configuration names. A store that is not of that kind (a directory
    or a device given to ``file``, a regular file given to ``block``) is refused, never reinterpreted. Blocking."""
    try:
        opener = _BACKENDS[backend]
    except KeyError:
        raise StorageError(f"no backend {backend!r} in this lunsync (known: {', '.join(_BACKENDS)})") from None
    return opener(spec)


def _open_file(spec: StoreSpec) -> BlockDevice:
    # A missing file is created (that is what ``lun create`` asks for); an existing one is adopted as it is.
    if not os.path.lexists(spec.path):
        os.makedirs(os.path.dirname(spec.path), mode=0o700, exist_ok=True)
        return FileBackend.create(spec.path, spec.size_bytes, spec.block_size, spec.thin, spec.read_only)
    return FileBackend.open(spec.path, spec.block_size, spec.thin, spec.read_only)


def _open_block(spec: StoreSpec) -> BlockDevice:
    return BlockDevBackend.open(spec.path, spec.block_size, spec.thin, spec.read_only)


def _open_rbd(spec: StoreSpec) -> BlockDevice:
    # Imported here: librbd's bindings are a Debian package a file-only host (or the Windows client) may lack.
    from lunsync.snapshots import rbd

    return rbd.open_image(spec)


register_backend("file", _open_file)
register_backend("block", _open_block)
register_backend("rbd", _open_rbd)

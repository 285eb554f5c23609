"""The resync (redirecting) volume: a destination LUN that serves a snapshot's contents while a copier fills it.

This module owns :class:`ResyncVolume`, the third kind of :class:`~lunsync.snapshots.device.BlockDevice` (after the
plain volume and the volume with snapshots), its persistent region bitmap (:class:`BitmapFile`), its background
copier and the copier's throttles (:class:`FixedRate`, :class:`AdaptiveThrottle`). The destination is divided into
regions (the snapshot chunk size). A region is *done* when its data is on the destination and *pending* when it must
still be read from the source (a read-only snapshot view). Reads of pending regions are redirected to the source;
a write covering whole regions marks them done without a copy; a partial write first brings its region over; UNMAP
marks its regions done. The copier walks the pending regions with ``os.copy_file_range`` when the source declares
:class:`~lunsync.snapshots.device.FileExtents` and the destination :class:`~lunsync.snapshots.device.CopyTarget`
(and with ``read``/``write`` through the devices otherwise; it never looks inside either), and commits the bitmap only after the
destination data is durable: fdatasync the destination, then write the bitmap atomically (temp file, fsync, rename,
directory fsync). A crash (kill -9) therefore resumes from the last commit and never marks a region done whose data
could still be lost. A SYNCHRONIZE CACHE or a FUA write commits too, so an acknowledged flush covers the regions that
foreground writes made done. The source is never written. Nothing here knows about SCSI, VSS or the catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lunsync.snapshots import fsutil
from lunsync.snapshots.device import BlockDevice, Buffer, CopyTarget, FileExtents, LbaExtent
from lunsync.snapshots.errors import NotReady, OutOfRange, ReadOnly, StorageError, Unreachable
from lunsync.snapshots.progress import RateWindow

__all__ = [
    "AdaptiveThrottle",
    "BitmapFile",
    "FixedRate",
    "RegionBitmap",
    "ResyncProgress",
    "ResyncState",
    "ResyncVolume",
    "Throttle",
    "Unthrottled",
    "extent_pieces",
    "moved_pieces",
]

log = logging.getLogger("lunsync.resync")

MiB = 1 << 20

# Copier batch: large enough that copy_file_range runs at device speed, small enough that a foreground write waiting
# for a busy region waits milliseconds, not seconds.
DEFAULT_BATCH_BYTES = 32 * MiB
# Holes are skipped (punched), not copied, so a hole-only step can cover much more.
HOLE_BATCH_BYTES = 1 << 30
# The bitmap is committed at most this often by the copier (each commit is an fdatasync of the destination plus the
# bitmap write); flushes from initiators commit whenever they come.
DEFAULT_COMMIT_INTERVAL_S = 1.0
# A source out of reach (its worker restarting, which takes a few seconds) is tried again after this, doubling up to
# the maximum: soon enough that the copy goes on within a second or two of its return.
UNREACHABLE_WAIT_S = 0.1
UNREACHABLE_WAIT_MAX_S = 1.0


# --- the persistent bitmap ----------------------------------------------------------------------------------------


class RegionBitmap:
    """One byte per region: 1 pending, 0 done. ``bytes.find`` keeps every scan in C, and the file form is compressed,
    so a 64 GiB LUN in 64 KiB regions (1 Mi regions) commits a few hundred bytes while mostly done or mostly pending."""

    __slots__ = ("bits", "pending")

    def __init__(self, num_regions: int, pending: Iterable[int] | None = None, *, all_pending: bool = False) -> None:
        self.bits = bytearray(b"\x01" * num_regions if all_pending else bytes(num_regions))
        if pending is not None and not all_pending:
            for r in pending:
                if not 0 <= r < num_regions:
                    raise ValueError(f"pending region {r} outside 0..{num_regions}")
                self.bits[r] = 1
        self.pending = self.bits.count(1)

    @classmethod
    def from_bytes(cls, data: bytes) -> RegionBitmap:
        bm = cls(0)
        bm.bits = bytearray(data)
        bm.pending = bm.bits.count(1)
        return bm

    def __len__(self) -> int:
        return len(self.bits)

    def is_pending(self, r: int) -> bool:
        return self.bits[r] == 1

    def any_pending(self, first: int, last: int) -> bool:
        """True when a region in ``first..last`` (inclusive) is pending."""
        return self.bits.find(1, first, last + 1) >= 0

    def mark_done(self, r: int) -> bool:
        if self.bits[r]:
            self.bits[r] = 0
            self.pending -= 1
            return True
        return False

    def next_pending(self, start: int) -> int:
        """The first pending region at or after ``start``, or -1."""
        return self.bits.find(1, start)

    def run_end(self, start: int, limit: int) -> int:
        """One past the last region of the pending run that starts at ``start``, at most ``limit``."""
        end = self.bits.find(0, start, limit)
        return limit if end < 0 else end

    def grow(self, num_regions: int) -> None:
        if num_regions > len(self.bits):
            self.bits.extend(bytes(num_regions - len(self.bits)))


_HEADER = struct.Struct("<4sIQQQQQII")  # magic, version, region_bytes, regions, source_blocks, total, copied, crc, len
_MAGIC = b"LSRB"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class BitmapImage:
    """What one commit holds: the geometry it belongs to, the counters that must survive a restart, the bits."""

    region_bytes: int
    source_blocks: int
    bytes_total: int
    bytes_copied: int
    bits: bytes


class BitmapFile:
    """A bitmap committed the rtslib way (:func:`lunsync.snapshots.fsutil.atomic_write`): a temporary file beside
    ``PATH``, fsync'ed, renamed over ``PATH``, then the directory fsync'ed.

    A reader sees either the previous commit or this one, never a torn one; a CRC catches a file damaged otherwise.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def load(self) -> BitmapImage | None:
        """The last commit, or None when there is none. A damaged file is an error, not a fresh start."""
        try:
            with open(self.path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        if len(blob) < _HEADER.size:
            raise StorageError(f"{self.path}: truncated resync bitmap")
        magic, version, region_bytes, regions, source_blocks, total, copied, crc, length = _HEADER.unpack_from(blob)
        payload = blob[_HEADER.size:]
        if magic != _MAGIC or version != _VERSION or len(payload) != length or zlib.crc32(payload) != crc:
            raise StorageError(f"{self.path}: not a valid resync bitmap (damaged or from another version)")
        bits = zlib.decompress(payload)
        if len(bits) != regions:
            raise StorageError(f"{self.path}: bitmap holds {len(bits)} regions, header says {regions}")
        return BitmapImage(region_bytes, source_blocks, total, copied, bits)

    def save(self, image: BitmapImage) -> None:
        """Commit ``image`` atomically and durably. Blocking: run it in a thread."""
        payload = zlib.compress(image.bits, 1)
        header = _HEADER.pack(_MAGIC, _VERSION, image.region_bytes, len(image.bits), image.source_blocks,
                              image.bytes_total, image.bytes_copied, zlib.crc32(payload), len(payload))
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        fsutil.atomic_write(self.path, header + payload)

    def remove(self) -> None:
        fsutil.remove_file(self.path)


# --- throttles --------------------------------------------------------------------------------------------------


class Throttle(Protocol):
    """Paces the copier. ``batch_bytes`` bounds the next batch; ``pace`` runs after each batch and may sleep."""

    def batch_bytes(self, default: int) -> int: ...

    async def pace(self, nbytes: int, seconds: float) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class Unthrottled:
    """Copy as fast as the storage goes (tests, maintenance windows)."""

    def batch_bytes(self, default: int) -> int:
        return default

    async def pace(self, nbytes: int, seconds: float) -> None:
        await asyncio.sleep(0)

    def describe(self) -> dict[str, Any]:
        return {"mode": "none", "rate_bps": None}


class FixedRate:
    """``--rate``: a token bucket at ``rate_bps`` bytes per second with a burst of one batch."""

    def __init__(self, rate_bps: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        self.rate_bps = float(rate_bps)
        self._clock = clock
        self._next = clock()

    def batch_bytes(self, default: int) -> int:
        # A batch is at most a quarter second's worth, so the rate holds at short time scales too.
        return max(64 << 10, min(default, int(self.rate_bps / 4)))

    async def pace(self, nbytes: int, seconds: float) -> None:
        now = self._clock()
        self._next = max(self._next, now - 0.25) + nbytes / self.rate_bps
        delay = self._next - now
        await asyncio.sleep(max(0, delay))

    def describe(self) -> dict[str, Any]:
        return {"mode": "fixed", "rate_bps": self.rate_bps}


class LatencyMonitor:
    """Foreground service time on the destination: a fast EWMA (what initiators see now) and a baseline.

    The baseline is what the LUN did before the resync when the caller knows it (the daemon passes the LUN's mean
    command latency); otherwise it is learnt as the lowest smoothed latency seen, drifting up slowly so that one
    lucky cache-hot second cannot pin it low forever (BBR's min-RTT filter, with a decay).
    """

    __slots__ = ("_drift_at", "alpha", "baseline_s", "ewma_s", "fixed_baseline", "last_op", "ops")

    def __init__(self, baseline_s: float | None = None, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.fixed_baseline = baseline_s is not None
        self.baseline_s = baseline_s
        self.ewma_s: float | None = None
        self.last_op = 0.0
        self.ops = 0
        self._drift_at = 0.0

    def record(self, seconds: float, now: float) -> None:
        self.ops += 1
        self.last_op = now
        e = self.ewma_s
        e = seconds if e is None else e + self.alpha * (seconds - e)
        self.ewma_s = e
        if not self.fixed_baseline and self.ops >= 16:
            b = self.baseline_s
            if b is None or e < b:
                self.baseline_s = e
                self._drift_at = now
            elif now - self._drift_at > 1.0:
                self.baseline_s = b * 1.02
                self._drift_at = now


class AdaptiveThrottle:
    """The default: copy at full speed while initiators are idle or unhurt, back off multiplicatively while their
    latency on the destination is above the baseline (x ``tolerance`` plus ``slack_s``), and creep back up
    additively when it recovers (AIMD, as TCP does for the same reason: share a bottleneck without measuring it)."""

    def __init__(self, monitor: LatencyMonitor, *, tolerance: float = 1.5, slack_s: float = 200e-6,
                 min_rate_bps: float = 4 * MiB, idle_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.monitor = monitor
        self.tolerance = tolerance
        self.slack_s = slack_s
        self.min_rate_bps = min_rate_bps
        self.idle_s = idle_s
        self._clock = clock
        self.rate_bps: float | None = None  # None: unlimited
        self.copy_bps: float | None = None  # what the copier achieves unthrottled, to start backing off from
        self.backoffs = 0

    def congested(self) -> bool:
        m = self.monitor
        if m.ewma_s is None or m.baseline_s is None or self._clock() - m.last_op > self.idle_s:
            return False
        return m.ewma_s > m.baseline_s * self.tolerance + self.slack_s

    def batch_bytes(self, default: int) -> int:
        if self.rate_bps is None:
            # Foreground I/O present: keep batches short so a write that waits for a busy region waits little.
            busy = self._clock() - self.monitor.last_op <= self.idle_s
            return min(default, 8 * MiB) if busy else default
        return max(64 << 10, min(default, int(self.rate_bps / 10)))

    async def pace(self, nbytes: int, seconds: float) -> None:
        if seconds > 0 and nbytes:
            speed = nbytes / seconds
            self.copy_bps = speed if self.copy_bps is None else 0.8 * self.copy_bps + 0.2 * speed
        if self.congested():
            start = self.rate_bps if self.rate_bps is not None else (self.copy_bps or 256 * MiB)
            self.rate_bps = max(self.min_rate_bps, start * 0.5)
            self.backoffs += 1
        elif self.rate_bps is not None:
            self.rate_bps += max(self.rate_bps * 0.1, 4 * MiB)
            if self.copy_bps is not None and self.rate_bps > 2 * self.copy_bps:
                self.rate_bps = None
        if self.rate_bps is None:
            await asyncio.sleep(0)
            return
        delay = nbytes / self.rate_bps - seconds
        await asyncio.sleep(max(0, delay))

    def describe(self) -> dict[str, Any]:
        m = self.monitor
        return {"mode": "adaptive", "rate_bps": self.rate_bps, "foreground_latency_s": m.ewma_s,
                "baseline_latency_s": m.baseline_s, "backoffs": self.backoffs}


# --- the volume ---------------------------------------------------------------------------------------------------


class ResyncState(enum.StrEnum):
    COPYING = "copying"
    PAUSED = "paused"  # the copier is stopped (daemon shutdown); the bitmap resumes it next time
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ResyncProgress:
    """A snapshot of one resync's counters (what status, the API and the metrics show)."""

    state: ResyncState
    bytes_total: int  # bytes pending when the resync began
    bytes_done: int  # of those, bytes now on the destination (copied, overwritten or unmapped)
    bytes_copied: int  # bytes the copier (and partial writes) moved
    regions_pending: int
    region_bytes: int
    rate_bps: float  # bytes done per second of wall-clock time, over the last seconds (0 until measured)
    eta_s: float | None
    redirected_reads: int
    redirected_read_bytes: int
    foreground_latency_s: float | None
    throttle: dict[str, Any]
    error: str | None

    @property
    def percent(self) -> float:
        return 100.0 if self.bytes_total == 0 else round(100.0 * self.bytes_done / self.bytes_total, 2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "percent": self.percent, "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done, "bytes_copied": self.bytes_copied, "regions_pending": self.regions_pending,
            "region_bytes": self.region_bytes, "rate_bps": round(self.rate_bps, 1), "eta_s": self.eta_s,
            "redirected_reads": self.redirected_reads, "redirected_read_bytes": self.redirected_read_bytes,
            "foreground_latency_s": self.foreground_latency_s, "throttle": self.throttle, "error": self.error,
        }


class ResyncVolume:
    """A destination under resync from a read-only source, behind the BlockDevice protocol.

    The source and destination stay owned by the caller: :meth:`close` stops the copier and commits, and closes
    neither. Build one with :meth:`open`, which resumes from a committed bitmap when there is one, then :meth:`start`
    the copier. The destination must already be at least as large as the source and have the same block size.
    """

    def __init__(self, source: BlockDevice, dest: BlockDevice, store: BitmapFile, bitmap: RegionBitmap,
                 region_bytes: int, bytes_total: int, bytes_copied: int, *, throttle: Throttle | None,
                 monitor: LatencyMonitor, batch_bytes: int, commit_interval_s: float,
                 clock: Callable[[], float]) -> None:
        self.source = source
        self.dest = dest
        self.store = store
        self.bitmap = bitmap
        self.region_bytes = region_bytes
        self._bs: int = dest.block_size
        self._rb: int = region_bytes // self._bs  # blocks per region
        self._src_blocks: int = source.num_blocks
        self.bytes_total = bytes_total
        self.bytes_copied = bytes_copied
        self.monitor = monitor
        self.throttle: Throttle = throttle if throttle is not None else AdaptiveThrottle(monitor, clock=clock)
        self.batch_bytes = batch_bytes
        self.commit_interval_s = commit_interval_s
        self._clock = clock
        # Regions somebody is bringing over or overwriting right now; waiters await the future.
        self._busy: dict[int, asyncio.Future[None]] = {}
        self._dirty = False  # done bits not yet committed
        self._commit_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._finished: asyncio.Future[ResyncState] | None = None
        self._stop = False
        self._cursor = 0
        self.state = ResyncState.COPYING if bitmap.pending else ResyncState.DONE
        self.error: str | None = None
        self.redirected_reads = 0
        self.redirected_read_bytes = 0
        self.commits = 0
        # Rate and ETA from bytes done over wall-clock time: the throttle's sleeps count (see lunsync.snapshots.progress).
        self._window = RateWindow()
        self._window.add(clock(), max(0, bytes_total - min(bytes_total, bitmap.pending * region_bytes)))
        self.on_commit: Callable[[ResyncProgress], None] | None = None
        self.source_unreachable: str | None = None  # why the copier is waiting for its source, while it is

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        source: BlockDevice,
        dest: BlockDevice,
        store: BitmapFile | str | os.PathLike[str],
        *,
        region_bytes: int = 64 << 10,
        pending_regions: Iterable[int] | None = None,
        throttle: Throttle | None = None,
        baseline_latency_s: float | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        commit_interval_s: float = DEFAULT_COMMIT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> ResyncVolume:
        """Resume the resync committed in ``store``, or begin one and commit its first bitmap before returning.

        ``pending_regions`` (region indexes) limits a new resync to what differs, e.g. the chunks of the origin that
        changed since the snapshot; without it every region the source covers is pending. Regions of a destination
        larger than the source are done from the start: the destination keeps its own data beyond the snapshot.
        """
        if not isinstance(store, BitmapFile):
            store = BitmapFile(store)
        bs = dest.block_size
        if source.block_size != bs:
            raise ValueError(f"block sizes differ: source {source.block_size}, destination {bs}")
        if region_bytes <= 0 or region_bytes % bs or region_bytes & (region_bytes - 1):
            raise ValueError(f"region size {region_bytes} must be a power of two and a multiple of {bs}")
        if dest.num_blocks < source.num_blocks:
            raise OutOfRange(f"destination holds {dest.num_blocks} blocks, the source {source.num_blocks}: "
                             "grow the destination first")
        if dest.read_only:
            raise ReadOnly("the resync destination is read-only")
        rb = region_bytes // bs
        regions = -(-dest.num_blocks // rb)
        src_regions = -(-source.num_blocks // rb)
        image = await asyncio.to_thread(store.load)
        monitor = LatencyMonitor(baseline_latency_s)
        if image is not None:
            if image.region_bytes != region_bytes or image.source_blocks != source.num_blocks:
                raise StorageError(f"{store.path}: committed for another geometry (region {image.region_bytes} B, "
                                   f"source {image.source_blocks} blocks)")
            bitmap = RegionBitmap.from_bytes(image.bits)
            if len(bitmap) > regions:
                raise StorageError(f"{store.path}: bitmap covers {len(bitmap)} regions, the destination {regions}")
            bitmap.grow(regions)
            vol = cls(source, dest, store, bitmap, region_bytes, image.bytes_total, image.bytes_copied,
                      throttle=throttle, monitor=monitor, batch_bytes=batch_bytes,
                      commit_interval_s=commit_interval_s, clock=clock)
            log.info("resync %s: resumed with %d of %d regions pending", store.path, bitmap.pending, regions)
            return vol
        if pending_regions is None:
            bitmap = RegionBitmap(regions)
            bitmap.bits[:src_regions] = b"\x01" * src_regions
            bitmap.pending = src_regions
            total = source.num_blocks * bs
        else:
            wanted = [r for r in pending_regions if r < src_regions]
            bitmap = RegionBitmap(regions, wanted)
            # Every pending region is whole except perhaps the last one of the source.
            total = bitmap.pending * region_bytes
            if src_regions and bitmap.is_pending(src_regions - 1):
                total -= region_bytes - cls._region_len(src_regions - 1, rb, source.num_blocks) * bs
        vol = cls(source, dest, store, bitmap, region_bytes, total, 0, throttle=throttle, monitor=monitor,
                  batch_bytes=batch_bytes, commit_interval_s=commit_interval_s, clock=clock)
        await asyncio.to_thread(store.save, vol._image())
        return vol

    @staticmethod
    def _iter_pending(bitmap: RegionBitmap) -> Iterable[int]:
        r = bitmap.next_pending(0)
        while r >= 0:
            yield r
            r = bitmap.next_pending(r + 1)

    @staticmethod
    def _region_len(r: int, rb: int, src_blocks: int) -> int:
        """Blocks of region ``r`` that lie inside the source."""
        return max(0, min(rb, src_blocks - r * rb))

    def _image(self) -> BitmapImage:
        return BitmapImage(self.region_bytes, self._src_blocks, self.bytes_total, self.bytes_copied,
                           bytes(self.bitmap.bits))

    # --- BlockDevice properties ---------------------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_blocks(self) -> int:
        n: int = self.dest.num_blocks
        return n

    @property
    def read_only(self) -> bool:
        return False

    @property
    def thin(self) -> bool:
        t: bool = self.dest.thin
        return t

    # --- helpers ------------------------------------------------------------------------------------------------

    def _check_range(self, lba: int, blocks: int) -> None:
        if lba < 0 or blocks < 0 or lba + blocks > self.dest.num_blocks:
            raise OutOfRange(f"blocks {lba}+{blocks} outside 0..{self.dest.num_blocks}")

    def _regions(self, lba: int, blocks: int) -> tuple[int, int]:
        return lba // self._rb, (lba + blocks - 1) // self._rb

    async def _claim(self, first: int, last: int) -> list[int]:
        """Take every still-pending region in ``first..last`` for this caller, in ascending order (so two writers
        never wait on each other in a cycle). Regions that became done while waiting are skipped."""
        mine: list[int] = []
        loop = asyncio.get_running_loop()
        bm = self.bitmap
        r = bm.next_pending(first)
        while 0 <= r <= last:
            fut = self._busy.get(r)
            if fut is not None:
                await asyncio.shield(fut)
                continue  # look at r again: it is probably done now
            if bm.is_pending(r):
                self._busy[r] = loop.create_future()
                mine.append(r)
            r = bm.next_pending(r + 1)
        return mine

    def _release(self, regions: Sequence[int], done: bool) -> None:
        for r in regions:
            if done and self.bitmap.mark_done(r):
                self._dirty = True
            fut = self._busy.pop(r, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        if done and self.bitmap.pending == 0 and self._task is None and self.state is ResyncState.COPYING:
            # Foreground writes finished the job without the copier: nothing is left to copy.
            self._finish(ResyncState.DONE)

    async def _bring_over(self, r: int) -> None:
        """Copy region ``r`` (claimed by the caller) from the source to the destination."""
        n = self._region_len(r, self._rb, self._src_blocks)
        if n:
            await self._copy(r * self._rb, n)
            self.bytes_copied += n * self._bs

    def _timed(self, started: float) -> None:
        now = time.perf_counter()
        self.monitor.record(now - started, self._clock())

    # --- data path ----------------------------------------------------------------------------------------------

    async def read(self, lba: int, blocks: int) -> Buffer:
        """Blocks from done regions come from the destination, from pending regions from the source."""
        self._check_range(lba, blocks)
        if blocks == 0:
            return bytearray()
        started = time.perf_counter()
        bm = self.bitmap
        first, last = self._regions(lba, blocks)
        if bm.pending == 0 or not bm.any_pending(first, last):
            data = await self.dest.read(lba, blocks)
            self._timed(started)
            return data
        end = lba + blocks
        src_end = self._src_blocks
        if end <= src_end and bm.bits.find(0, first, last + 1) < 0:
            self.redirected_reads += 1
            self.redirected_read_bytes += blocks * self._bs
            return await self.source.read(lba, blocks)
        out = bytearray(blocks * self._bs)
        cur = lba
        redirected = 0
        while cur < end:
            r = cur // self._rb
            # The tail of the last region past the source's end is the destination's own.
            pending = cur < src_end and bm.is_pending(r)
            if pending:
                stop = min(end, bm.run_end(r, last + 1) * self._rb, src_end)
            elif cur >= src_end:
                stop = end
            else:
                stop = min(end, _done_run_end(bm, r, last + 1) * self._rb)
            dev = self.source if pending else self.dest
            chunk = await dev.read(cur, stop - cur)
            off = (cur - lba) * self._bs
            out[off:off + len(chunk)] = chunk
            if pending:
                redirected += (stop - cur) * self._bs
            cur = stop
        self.redirected_reads += 1
        self.redirected_read_bytes += redirected
        return out

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        """Write to the destination. Pending regions the write covers whole become done without a copy; a pending
        region it covers in part is brought over first. With ``fua`` the data and the bitmap are durable on return."""
        nbytes = len(data)
        if nbytes % self._bs:
            raise ValueError(f"write of {nbytes} bytes is not a whole number of {self._bs}-byte blocks")
        blocks = nbytes // self._bs
        self._check_range(lba, blocks)
        if blocks == 0:
            return
        started = time.perf_counter()
        first, last = self._regions(lba, blocks)
        if self.bitmap.pending == 0 or not self.bitmap.any_pending(first, last):
            await self.dest.write(lba, data, fua)
            self._timed(started)
            return
        mine = await self._claim(first, last)
        ok = False
        try:
            end = lba + blocks
            for r in mine:
                r_start, r_end = r * self._rb, (r + 1) * self._rb
                if lba > r_start or end < min(r_end, self._src_blocks):
                    await self._bring_over(r)
            await self.dest.write(lba, data, fua)
            ok = True
        finally:
            self._release(mine, ok)
        if fua and mine:
            await self.commit()
        self._timed(started)

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE: the destination's data, and the bitmap that says which regions it holds, are durable."""
        await self.commit()

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Deallocate on the destination; the regions covered become done (partial ones are brought over first)."""
        for lba, blocks in ranges:
            self._check_range(lba, blocks)
        claimed: list[int] = []
        ok = False
        try:
            for lba, blocks in ranges:
                if not blocks:
                    continue
                first, last = self._regions(lba, blocks)
                if not self.bitmap.any_pending(first, last):
                    continue
                mine = await self._claim(first, last)
                claimed += mine
                for r in mine:
                    r_start, r_end = r * self._rb, (r + 1) * self._rb
                    if lba > r_start or lba + blocks < min(r_end, self._src_blocks):
                        await self._bring_over(r)
            await self.dest.unmap(ranges)
            ok = True
        finally:
            self._release(claimed, ok)

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        """The destination's mapping for done regions, the source's for pending ones."""
        if not 0 <= lba < self.dest.num_blocks:
            raise OutOfRange(f"block {lba} outside 0..{self.dest.num_blocks}")
        bm = self.bitmap
        out: list[LbaExtent] = []
        cur, end = lba, self.dest.num_blocks
        while cur < end and len(out) < max_extents:
            r = cur // self._rb
            pending = cur < self._src_blocks and bm.is_pending(r)
            if pending:
                stop = min(end, bm.run_end(r, len(bm)) * self._rb, self._src_blocks)
            elif cur >= self._src_blocks:
                stop = end
            else:
                stop = min(end, _done_run_end(bm, r, len(bm)) * self._rb)
            dev = self.source if pending else self.dest
            exts = dev.lba_status(cur, max_extents - len(out))
            if not exts:
                break
            for ext in exts:
                e_end = min(ext.lba + ext.blocks, stop)
                if out and out[-1].mapped == ext.mapped and out[-1].lba + out[-1].blocks == cur:
                    out[-1] = LbaExtent(out[-1].lba, e_end - out[-1].lba, ext.mapped)
                else:
                    out.append(LbaExtent(cur, e_end - cur, ext.mapped))
                cur = e_end
                if cur >= stop or len(out) >= max_extents:
                    break
        return out

    async def resize(self, num_blocks: int) -> None:
        """Grow the destination (new regions are done: they lie beyond the snapshot). Shrinking is refused."""
        if num_blocks < self.dest.num_blocks:
            raise NotReady("a LUN under resync cannot shrink")
        await self.dest.resize(num_blocks)
        self.bitmap.grow(-(-num_blocks // self._rb))

    async def close(self) -> None:
        """Stop the copier (the resync stays resumable) and commit. The source and destination stay open."""
        await self.stop()

    # --- the copier ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background copier (idempotent)."""
        if self._task is not None or self.state is not ResyncState.COPYING:
            if self._finished is None:
                self._finished = asyncio.get_running_loop().create_future()
                if self.state is not ResyncState.COPYING:
                    self._finished.set_result(self.state)
            return
        loop = asyncio.get_running_loop()
        if self._finished is None:
            self._finished = loop.create_future()
        self._stop = False
        self._task = loop.create_task(self._run(), name=f"resync-{os.path.basename(self.store.path)}")

    async def wait(self) -> ResyncState:
        """Wait until the resync is done, cancelled or failed (or paused by :meth:`stop`) and return its state."""
        if self._finished is None:
            self._finished = asyncio.get_running_loop().create_future()
            if self.state is not ResyncState.COPYING:
                self._finished.set_result(self.state)
        return await asyncio.shield(self._finished)

    async def cancel(self) -> None:
        """Stop copying for good. Regions already done stay on the destination; the rest never arrive, so the
        destination holds a mix until it is resynced again. The bitmap is removed."""
        await self._halt()
        self._finish(ResyncState.CANCELLED)
        await asyncio.to_thread(self.store.remove)

    async def stop(self) -> None:
        """Pause for a shutdown: stop the copier, commit, keep the bitmap so the next start resumes."""
        await self._halt()
        if self.state is ResyncState.COPYING:
            await self.commit()
            self._finish(ResyncState.PAUSED)

    async def _halt(self) -> None:
        self._stop = True
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])

    def _finish(self, state: ResyncState) -> None:
        self.state = state
        if self._finished is None:
            with contextlib.suppress(RuntimeError):
                self._finished = asyncio.get_running_loop().create_future()
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(state)

    async def commit(self) -> None:
        """Make the destination durable, then record which regions it holds (never the other way round)."""
        async with self._commit_lock:
            if not self._dirty:
                await self.dest.flush()
                return
            # The image is taken before the flush: every region it calls done had its data written before the
            # fdatasync began, so the data is on disk by the time the bitmap says so.
            self._dirty = False
            image = self._image()
            try:
                await self.dest.flush()
                await asyncio.to_thread(self.store.save, image)
            except BaseException:
                self._dirty = True
                raise
            self.commits += 1
        if self.on_commit is not None:
            try:
                self.on_commit(self.progress())
            except Exception:  # a progress listener must never break the data path
                log.exception("resync %s: progress listener failed", self.store.path)

    async def _run(self) -> None:
        last_commit = self._clock()
        wait_s = UNREACHABLE_WAIT_S
        background: asyncio.Task[None] | None = None
        try:
            while not self._stop and self.bitmap.pending:
                batch = self._next_batch()
                if batch is None:
                    # Every pending region is claimed by a foreground writer: let them finish.
                    await asyncio.sleep(0.001)
                    continue
                first, stop = batch
                mine = await self._claim(first, stop - 1)
                if not mine:
                    continue
                t0 = time.perf_counter()
                moved = 0
                ok = False
                try:
                    # _claim may skip regions (done meanwhile); copy contiguous stretches of what it took.
                    run_start = mine[0]
                    for i, r in enumerate(mine):
                        if i + 1 == len(mine) or mine[i + 1] != r + 1:
                            lba = run_start * self._rb
                            n = min((r + 1) * self._rb, self._src_blocks) - lba
                            if n > 0:
                                moved += await self._copy(lba, n)
                            if i + 1 < len(mine):
                                run_start = mine[i + 1]
                    ok = True
                except Unreachable as exc:
                    # The source is served by another process that is down for now: the batch stays pending (what
                    # of it was written is copied again) and the copier tries again until the source is back.
                    if self.source_unreachable is None:
                        log.warning("resync %s: the source is out of reach (%s); the copy waits for it",
                                    self.store.path, exc)
                    self.source_unreachable = str(exc)
                finally:
                    self._release(mine, ok)
                if not ok:
                    self._cursor = first
                    await asyncio.sleep(wait_s)
                    wait_s = min(2 * wait_s, UNREACHABLE_WAIT_MAX_S)
                    continue
                if self.source_unreachable is not None:
                    log.info("resync %s: the source is back; the copy goes on", self.store.path)
                    self.source_unreachable = None
                wait_s = UNREACHABLE_WAIT_S
                self.bytes_copied += moved
                seconds = time.perf_counter() - t0
                self._window.add(self._clock(), self._bytes_done())
                if self._clock() - last_commit >= self.commit_interval_s and (
                        background is None or background.done()):
                    if background is not None:
                        background.result()  # a failed commit ends the job
                    # The commit (fdatasync, then the bitmap) overlaps the next copies: its image is taken first,
                    # so it only ever records regions whose data its fdatasync covers.
                    background = asyncio.get_running_loop().create_task(self.commit())
                    last_commit = self._clock()
                await self.throttle.pace(moved, seconds)
            if background is not None:
                await background
            if self._stop:
                return
            await self.commit()
            # The bitmap goes before DONE is announced: whoever waits for the job then finds nothing left to resume.
            # A bitmap that cannot be removed costs a needless resume check at most; the data is all there.
            try:
                await asyncio.to_thread(self.store.remove)
            except OSError as exc:
                log.warning("resync %s: done, but its bitmap could not be removed: %s", self.store.path, exc)
            self._finish(ResyncState.DONE)
            log.info("resync %s: done, %d bytes copied", self.store.path, self.bytes_copied)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends the job as FAILED, with its reason kept
            self.error = str(exc) or type(exc).__name__
            log.error("resync %s failed: %s", self.store.path, self.error)
            with contextlib.suppress(Exception):
                await self.commit()  # keep what was done: a retry resumes from it
            self._finish(ResyncState.FAILED)

    def _next_batch(self) -> tuple[int, int] | None:
        """The next run of pending, unclaimed regions from the cursor (wrapping once), bounded by the throttle."""
        bm = self.bitmap
        limit_regions = max(1, self.throttle.batch_bytes(self.batch_bytes) // self.region_bytes)
        for start in (self._cursor, 0):
            r = bm.next_pending(start)
            while r >= 0 and r in self._busy:
                r = bm.next_pending(r + 1)
            if r < 0:
                continue
            stop = bm.run_end(r, min(len(bm), r + limit_regions))
            for b in range(r, stop):  # stop before a region a writer holds
                if b in self._busy:
                    stop = b
                    break
            self._cursor = stop
            return r, stop
        return None

    async def _copy(self, lba: int, blocks: int) -> int:
        """Copy blocks from the source to the destination; return the bytes actually moved (holes are punched).

        The copy runs in a thread, so the source can move under it: a snapshot chunk still held by the origin is
        preserved to the pool, and only then overwritten, by a write that lands meanwhile. After each copy the
        extents are resolved again and what moved is copied again from where it now lives; a chunk that still maps
        to the origin was not written during the copy (its preservation would have come first), so the copy holds."""
        source, dest = self.source, self.dest
        if not isinstance(source, FileExtents) or not isinstance(dest, CopyTarget):
            data = await source.read(lba, blocks)
            await dest.write(lba, data)
            return blocks * self._bs
        extents = source.file_extents(lba, blocks)
        # A destination with copy-on-write (the origin of other snapshots) preserves what it is about to lose.
        dfd = await dest.begin_copy(lba, blocks)
        base = lba * self._bs
        moved = await self._place(extent_pieces(extents, base), dfd)
        while True:
            again = source.file_extents(lba, blocks)
            changed = moved_pieces(extents, again, base)
            if not changed:
                return moved
            moved += await self._place(changed, await dest.begin_copy(lba, blocks))
            extents = again

    async def _place(self, pieces: list[tuple[int, int, int, int]], dfd: int) -> int:
        """Copy each (fd, source offset, length, destination offset) piece, punching those with fd -1."""
        bs = self._bs
        copies = [(fd, off, dst, length) for fd, off, length, dst in pieces if fd >= 0]
        holes = [(dst // bs, length // bs) for fd, _, length, dst in pieces if fd < 0]
        if copies:
            try:
                await asyncio.to_thread(_copy_all, copies, dfd)
            except OSError as exc:
                lba = copies[0][2] // bs
                raise fsutil.storage_error(exc, f"resync copy at block {lba}", lba, write=True) from exc
        if holes:
            await self.dest.unmap(holes)
        return sum(length for _, _, _, length in copies)

    # --- status -------------------------------------------------------------------------------------------------

    def bytes_pending(self) -> int:
        total = 0
        for r in self._iter_pending(self.bitmap):
            total += self._region_len(r, self._rb, self._src_blocks)
        return total * self._bs

    def _bytes_done(self) -> int:
        pending_bytes = min(self.bytes_total, self.bitmap.pending * self.region_bytes) if self.bitmap.pending else 0
        return max(0, self.bytes_total - pending_bytes)

    def progress(self) -> ResyncProgress:
        done = self._bytes_done()
        rate, eta = 0.0, (0.0 if done >= self.bytes_total else None)
        if self.state is ResyncState.COPYING:
            now = self._clock()
            rate = self._window.rate_bps(now, done) or 0.0
            left = self._window.eta_s(now, done, self.bytes_total)
            eta = None if left is None else round(left, 1)
        return ResyncProgress(
            state=self.state, bytes_total=self.bytes_total, bytes_done=done, bytes_copied=self.bytes_copied,
            regions_pending=self.bitmap.pending, region_bytes=self.region_bytes, rate_bps=rate, eta_s=eta,
            redirected_reads=self.redirected_reads, redirected_read_bytes=self.redirected_read_bytes,
            foreground_latency_s=self.monitor.ewma_s, throttle=self.throttle.describe(), error=self.error,
        )


def extent_pieces(extents: list[tuple[int, int, int]], base: int) -> list[tuple[int, int, int, int]]:
    """Extents laid end to end from destination offset ``base``, as (fd, source offset, length, destination offset):
    what an offloaded copy of :meth:`~lunsync.snapshots.device.FileExtents.file_extents` to ``base`` does."""
    out = []
    for fd, off, length in extents:
        out.append((fd, off, length, base))
        base += length
    return out


def moved_pieces(before: list[tuple[int, int, int]], after: list[tuple[int, int, int]], base: int
                  ) -> list[tuple[int, int, int, int]]:
    """The parts of ``after`` that map somewhere else than in ``before`` (both cover the same range from ``base``),
    as :func:`extent_pieces`. Two runs reading as zeros (fd -1) are the same wherever they say they are."""
    a, b = extent_pieces(before, base), extent_pieces(after, base)
    out: list[tuple[int, int, int, int]] = []
    i = j = 0
    pos = base
    while i < len(a) and j < len(b):
        fd1, off1, len1, dst1 = a[i]
        fd2, off2, len2, dst2 = b[j]
        end = min(dst1 + len1, dst2 + len2)
        src = off2 + pos - dst2
        if fd1 != fd2 or (fd1 >= 0 and off1 + pos - dst1 != src):
            last = out[-1] if out else None
            if last is not None and last[0] == fd2 and last[3] + last[2] == pos and (fd2 < 0 or last[1] + last[2] == src):
                out[-1] = (fd2, last[1], last[2] + end - pos, last[3])
            else:
                out.append((fd2, src, end - pos, pos))
        pos = end
        if dst1 + len1 == end:
            i += 1
        if dst2 + len2 == end:
            j += 1
    return out


def _copy_all(copies: list[tuple[int, int, int, int]], dst_fd: int) -> None:
    for src_fd, src_off, dst_off, length in copies:
        fsutil.copy_range(src_fd, dst_fd, length, src_off, dst_off)


def _done_run_end(bm: RegionBitmap, start: int, limit: int) -> int:
    end = bm.bits.find(1, start, limit)
    return limit if end < 0 else end


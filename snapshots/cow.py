"""Differential (copy-on-write) snapshots: the pool, the snapshot-aware volume and the read-only snapshot view.

This module owns the data path of snapshots. A :class:`Pool` is a directory (possibly on other, cheaper storage than
the LUNs) holding, per origin LUN, a pool file of preserved units (``lun-<id>.cow``, blocks of one unit) and a map log
(``lun-<id>.map``), plus ``pool.db``, the checkpointed chunk maps: ``packed(lun_id, chunk, epoch, loc, mask)`` (the
units in ``mask`` of a copy lie in the blocks from ``loc`` on), ``copies(lun_id, chunk, epoch, slot, mask)`` (the
older layout: a copy in a chunk-sized slot at ``slot x chunk``, still read and added to) and ``zero_copies`` in
SQLite, WAL, ``synchronous=FULL``. A preservation batch costs one flush round: the pool file's
fdatasync and one small append and fdatasync of the map log, issued together in two threads (no SQLite commit on
the hot path; the log is checkpointed into pool.db every few thousand records, before any copy is forgotten, and at
close), shared by every preservation that happened at the same time (group commit). A chunk that is a hole on the origin is recorded as ``ZERO``: no copy, no blocks, and
no pool-file sync. The maps live next to the data they describe, not in the catalog, so the hot path never contends
with management transactions, and losing the pool's storage loses the snapshots coherently, never leaving maps that
point at nothing.

A :class:`CowVolume` wraps an origin backend and is the LUN's :class:`~lunsync.snapshots.device.BlockDevice`. Each
snapshot of the LUN has an epoch, increasing per LUN. The maps are kept per chunk, but copies are made per unit
(4 KiB, or a 64th of a chunk larger than 256 KiB): before a unit is first overwritten after the newest snapshot, its
old contents are copied into the pool for the chunk's copy of the newest epoch ``e`` and the copy's mask gains it, so a
4 KiB first write copies 4 KiB and a later first write to another unit of the chunk adds that unit to the same copy.
The copies are packed: a batch's units go to one run of consecutive blocks of the pool file (the first free run long
enough, else the file's end), in chunk and unit order, written with one ``pwritev``, so the file system allocates
and writes back one extent per batch instead of one per copy; each map record says where its units are (its slot
field holds ``PACKED - block``, see :func:`_place`), so a copy has a piece per batch that added to it. That one
copy serves every snapshot whose epoch lies in ``(epoch of the chunk's previous copy, e]``, so a first write costs
the same with 8 snapshots as with 1. Reading unit ``u`` of snapshot ``s`` gives the earliest copy with epoch >= ``s``
that holds ``u``, else the origin (a unit never overwritten while an older epoch was the newest is held by a later
copy, if any). Whether a write must preserve is a dict lookup or two (``latest copy epoch < newest epoch``, then its
mask when it is not whole), so once a unit is preserved, writes go straight through.

The crash argument, which holds under kill -9 and power loss with any write-cache setting: the copy is written to
the pool file, its map record (carrying the CRC-32 of the bytes copied and where they are) is appended to the map log, both files are
fdatasync'ed at the same time, and only when both flushes have returned does the overwriting write reach the origin.
A crash before that leaves the origin's units as they were, whatever of the copy and the record reached the disk: no
record (the chunk is not preserved, and need not be), or a record whose copy does not match its CRC (a torn or lost
slot write; an open drops the record, see :class:`_MapLog`, with the same result), or a record whose copy matches
(preserved). A crash after it finds both durable. So a snapshot reads either the copy it had or the origin's
unchanged units, never a half-written copy; and batches run one after another, so a record is only ever unmatched
in the last batch before the crash. Concurrent writes to one chunk share the one preservation (a per-chunk in-flight
future), and preservations that arrive while a batch is being copied form the next batch. UNMAP and WRITE
SAME preserve first like any write, unit by unit; ``preserve_range`` (for copiers) preserves whole chunks. A copy is freed only when no live
snapshot maps to it, so snapshots can be deleted in any order; its blocks are punched, and reused by a later batch
only once pool.db durably no longer maps them (a free list of block runs, rebuilt at open from the maps: what no row
maps is free), and a pool file that maps nothing is truncated. When a preservation fails (pool full, I/O error) the
origin keeps serving: the snapshots that needed it are reported through ``on_invalid`` (which must make that durable)
before the write proceeds, and stop counting, so they are never silently wrong. Any error of the pool's storage counts
(ENOSPC, EROFS, EIO, a pool that cannot be opened at all): the pool's failure is the snapshots' loss, never the
origin's.

Write-back staging (``staging_bytes``, the daemon's ``--write-staging``): with the LUN's write cache on, a first write
without FUA is answered once it is queued behind its preservation, and held in memory in arrival order until its
batch is durable, then written to the origin. The ordering argument above is unchanged (nothing writes those origin
blocks before their copy and its record are durable: a held write lands only after, and every other path to the
origin, direct writes, UNMAP, the copiers' descriptors, lets the held writes it overlaps land first); what changes is
only when the initiator hears back, and it was told the cache is volatile. SYNCHRONIZE CACHE and FUA writes wait for
every held write before them; a hold (snapshot sets) waits for all of them, so a snapshot contains every write
answered before it; reads lay held writes over the origin.

A :class:`SnapshotView` is a read-only BlockDevice of one snapshot; writes are refused with :class:`ReadOnly` (DATA
PROTECT), and reads of an invalidated snapshot fail with :class:`NotReady`.

API for resync (live restore) built on top of this module:

- ``volume.view(epoch, num_blocks)`` opens a read-only :class:`SnapshotView` of a snapshot (the source of a restore).
- ``volume.changed_chunks(epoch)`` is the set of chunk numbers changed on the origin since snapshot ``epoch`` (every
  chunk with a copy of epoch >= ``epoch``): copying only these back makes the origin equal to the snapshot again.
  ``volume.chunk_size`` converts chunks to bytes.
- Copy-on-write stays active on a destination as long as everything that changes it goes through the volume's
  ``write``/``unmap``. A copier that writes the origin's file directly (``os.copy_file_range``) gets the descriptor
  from ``await volume.begin_copy(lba, blocks)`` (:class:`~lunsync.snapshots.device.CopyTarget`), which preserves the
  range first, and keeps that range from being written concurrently; other snapshots of the destination then stay
  intact. Views and volumes say where their bytes lie through ``file_extents``
  (:class:`~lunsync.snapshots.device.FileExtents`), and a view which chunks its origin changed through
  ``changed_regions`` (:class:`~lunsync.snapshots.device.ChangedRegions`).
- ``volume.hold()`` / ``volume.release()`` pause new writes and drain in-flight ones (a point in time), the primitive
  snapshot sets and a resync switch-over need.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import errno
import heapq
import itertools
import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lunsync.snapshots.device import BlockDevice, Buffer, FileExtent, FileExtents, InlineWrite, LbaExtent
from lunsync.snapshots.errors import NotReady, OutOfRange, OutOfSpace, ReadOnly, StorageError
from lunsync.snapshots.fsutil import copy_range, is_hole, pread_full, punch, pwrite_full, storage_error

__all__ = ["DEFAULT_STAGING_BYTES", "ZERO", "CowStats", "CowVolume", "Pool", "SnapshotView"]

log = logging.getLogger("lunsync.cow")

POOL_DB = "pool.db"
ZERO = -1  # the slot of a copy of a chunk that was a hole: it reads as zeros
# The slot of a map-log record that is no copy but says "snapshot epoch E lost a chunk": kept there when the catalog
# cannot record the invalidation, so that a crash before it can never bring the snapshot back as valid.
INVALIDATED = -2
# The slot of a copy whose units are packed (see CowVolume): they lie wherever their batch put them, in the pool
# file's blocks of one unit each, and each map record of such a copy says where its units are. A record's slot
# field carries that place as ``PACKED - block`` (so every value up to PACKED is a packed piece, and the slots of
# the older layout, 0 and up, keep their meaning).
PACKED = -3
FULL = -1  # the mask of a copy that holds every unit of its chunk (all bits set, whatever the chunk's size)
LOG_CHECKPOINT_RECORDS = 4096  # map-log records between checkpoints into pool.db (192 KiB of log)
_LOG_MAGIC = b"LSM3"
# generation, chunk, epoch, slot (or PACKED - block), mask of the copy's units so far (of a packed piece: its own),
# the units this record's batch copied, the chunk and unit sizes and the chunk's length on the origin (where those
# units lie in the pool file), and the CRC-32 of their bytes in the pool file
_LOG_BODY = struct.Struct("<QqqqqqIIII")
_LOG_REC = struct.Struct("<4sIQqqqqqIIII")  # magic, CRC-32 of the body, then the body: 72 bytes
# The records of the second format (no CRC of the data: written after the pool file's own fdatasync), still read.
_LOG2_MAGIC = b"LSM2"
_LOG2_BODY = struct.Struct("<Qqqqq")
_LOG2_REC = struct.Struct("<4sIQqqqq")
# The records of the first format (no mask: every copy was of the whole chunk), still read at open.
_LOG1_MAGIC = b"LSM1"
_LOG1_BODY = struct.Struct("<Qqqq")
_LOG1_REC = struct.Struct("<4sIQqqq")
_LOG_GROW = 64 << 10  # the map log's size is a multiple of this
# The daemon's default bound, per LUN, on first writes acknowledged before their preservation is durable (WCE=1).
DEFAULT_STAGING_BYTES = 64 << 20
_LAND_YIELD = 64  # staged writes landed on the origin between two yields to the event loop
_EXTENT_MAX = 1 << 20  # the most a preservation batch copies through one buffer (one preadv and one pwritev)
# A batch that copies more than this flushes its copies before writing their map records, which then carry no CRC
# (see CowVolume._copy_now); a smaller one flushes both at once.
_CRC_MAX_BYTES = 1 << 20
_IOV_MAX = 1024  # buffers per pwritev (Linux's UIO_MAXIOV)


class _Commit(Protocol):
    """The pool's commit, as the attribute that calls it (see Pool._commit)."""

    def __call__(self, lun_id: int, rows: Sequence[tuple[int, int, int, int]],
                 proofs: Sequence[tuple[int, int, int, int, int]] | None = None,
                 sync_data: Callable[[], None] | None = None) -> None: ...


# The map log's append, as the attribute that calls it (see _MapLog._append).
_Append = Callable[[Sequence[tuple[int, int, int, int]], Sequence[tuple[int, int, int, int, int]] | None,
                    Callable[[], None] | None], None]


@dataclass(slots=True)
class CowStats:
    """Plain integers the metrics collector samples; the hot path never calls Prometheus."""

    copies: int = 0  # chunks preserved
    copy_batches: int = 0  # group commits
    copy_seconds: float = 0.0  # summed latency of batches, from submit to commit
    copy_failures: int = 0
    invalidated: int = 0  # snapshots marked invalid by a failed preservation
    staged_writes: int = 0  # writes acknowledged from the staging area (WCE=1) before reaching the origin
    stage_waits: int = 0  # writes that waited for room in a full staging area (back-pressure)
    staged_bytes: int = 0  # held in the staging area now


# --- the pool ----------------------------------------------------------------------------------------------------


class _MapLog:
    """One LUN's map log: ``lun-<id>.map``, fixed-size records written after the log's end and fdatasync'ed together
    with the slot data they map. ``rows`` are the records of the current generation not yet checkpointed into
    ``pool.db``.

    The file is kept larger than its records: past the end lie written zeros and the records of older generations,
    so an append overwrites blocks that already hold data and its fdatasync is a data flush. An append that made the
    file longer would also commit the file system's journal (the size changed), which on ext4 waits for every other
    file's newly allocated data, the LUNs' included. The log grows, a reserve at a time, only when an append would
    pass its size.

    A reader takes records from the start up to the first one that is not a valid record of the current generation
    (a torn or zeroed record, or an older generation's): that is the end. So that the end found is never earlier
    than a record that follows it, no record of the current generation may lie past the end. ``stale_tail`` says
    one may (found past a torn record at open, or written by an append that failed): the pool then starts a new
    generation, durably, before the next append.

    A record of a copy carries the CRC-32 of the bytes its batch copied into the pool file (``data_path``), since
    the two files are flushed at the same time and either may reach the disk without the other. Opening checks
    every such record of the current generation (the ones not yet checkpointed) against the pool file and drops
    those that do not match: that batch's origin writes never happened, so the origin still holds what the copy
    would have held and the chunk is simply not preserved. The cost is one read of the copied bytes per record: at
    most LOG_CHECKPOINT_RECORDS records, each at most a chunk (in the worst case 256 MiB with 64 KiB chunks, 4 GiB
    with 1 MiB ones; 16 MiB when every record copied one 4 KiB unit, as first writes do), mostly from the page
    cache after a kill -9, and nothing after a clean stop, which checkpoints the log. zlib's
    CRC-32 serves where a CRC32C would (Python's standard library has none): it is there to tell a torn or missing
    write from the bytes that were copied, not to resist anyone."""

    def __init__(self, path: str, gen: int, data_path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.gen = gen
        self.rows: list[tuple[int, int, int, int]] = []
        self.end = 0
        self.lock = threading.Lock()
        # The append the pool calls: an attribute, so that a test can watch it on this log (a compiled class's
        # methods cannot be replaced).
        self.append: _Append = self._append
        raw = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        self.size = len(raw)
        self.stale_tail = False
        # A torn or stale tail ends the log: those records' origin writes never happened (they wait for the sync),
        # and records of an older generation are already in pool.db.
        first = raw[:4]
        if first in (_LOG1_MAGIC, _LOG2_MAGIC):
            # Written by an older format (LSM1: before copies had masks; LSM2: before records carried their data's
            # CRC, when the pool file was flushed before the record was written): read it, and start a new
            # generation (in the current format) before the next append, since two formats' records cannot share
            # one generation.
            v1 = first == _LOG1_MAGIC
            rec_size = _LOG1_REC.size if v1 else _LOG2_REC.size
            for off in range(0, len(raw) - rec_size + 1, rec_size):
                rec = raw[off:off + rec_size]
                if v1:
                    magic, crc, rgen, chunk, epoch, slot = _LOG1_REC.unpack(rec)
                    mask = FULL
                else:
                    magic, crc, rgen, chunk, epoch, slot, mask = _LOG2_REC.unpack(rec)
                if magic != first or crc != zlib.crc32(rec[8:]) or rgen != gen:
                    break
                self.rows.append((chunk, epoch, slot, mask))
            self.stale_tail = bool(self.rows)
            return
        checks: list[tuple[int, tuple[int, int, int, int, int, int, int]]] = []
        for off in range(0, len(raw) - _LOG_REC.size + 1, _LOG_REC.size):
            rec = raw[off:off + _LOG_REC.size]
            magic, crc, rgen, chunk, epoch, slot, mask, copied, cs, unit, length, data_crc = _LOG_REC.unpack(rec)
            if magic != _LOG_MAGIC or crc != zlib.crc32(rec[8:]) or rgen != gen:
                break
            if (slot >= 0 or slot <= PACKED) and copied:
                checks.append((len(self.rows), (slot, cs, unit, length, copied, data_crc, chunk)))
            self.rows.append((chunk, epoch, slot, mask))
            self.end = off + _LOG_REC.size
        self.stale_tail = any(
            raw[off:off + 4] == _LOG_MAGIC and _LOG_BODY.unpack_from(raw, off + 8)[0] == gen
            for off in range(self.end + _LOG_REC.size, len(raw) - _LOG_REC.size + 1, _LOG_REC.size))
        if checks:
            torn = self._torn(data_path, [c for _, c in checks])
            if torn:
                drop = {checks[i][0] for i in torn}
                log.warning("map log %s: %d record(s) whose slot data was not written (torn at a crash) are "
                            "dropped: chunks %s", path, len(drop),
                            sorted({self.rows[i][0] for i in drop})[:16])
                self.rows = [r for i, r in enumerate(self.rows) if i not in drop]
                # The dropped records stay in the file: start a new generation before the next append, so that a
                # later open never reads them with whatever the pool file holds by then.
                self.stale_tail = True

    @staticmethod
    def _torn(data_path: str, checks: Sequence[tuple[int, int, int, int, int, int, int]]) -> list[int]:
        """The indexes of ``(slot, chunk size, unit, length, copied units, crc, chunk)`` whose bytes in the slot
        file do not match their CRC. A pool file that cannot be read fails the open: dropping a record that may be
        good could let a snapshot read the overwritten origin."""
        fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            bad: list[int] = []
            for i, (slot, cs, unit, length, copied, want, _) in enumerate(checks):
                crc = 0
                for off, n in _runs(copied, unit, length):
                    got = os.pread(fd, n, _place(slot, copied, cs, unit, off))
                    crc = zlib.crc32(got + bytes(n - len(got)), crc)  # past the pool file's end reads as zeros
                if crc != want:
                    bad.append(i)
            return bad
        finally:
            os.close(fd)

    def _append(self, rows: Sequence[tuple[int, int, int, int]],
                proofs: Sequence[tuple[int, int, int, int, int]] | None,
                alongside: Callable[[], None] | None) -> None:
        """Write and fdatasync ``rows``: durable when this returns. ``proofs`` are each row's ``(copied units,
        chunk size, unit, length, CRC-32 of the copied bytes)`` (none for a row that copied nothing);
        ``alongside`` (the pool file's fdatasync) runs in another thread at the same time, and both must succeed.
        Caller holds ``lock`` and has started a new generation if ``stale_tail``."""
        buf = bytearray()
        for i, (chunk, epoch, slot, mask) in enumerate(rows):
            copied, cs, unit, length, data_crc = proofs[i] if proofs is not None else (0, 0, 0, 0, 0)
            body = _LOG_BODY.pack(self.gen, chunk, epoch, slot, mask, copied, cs, unit, length, data_crc)
            buf += _LOG_MAGIC + zlib.crc32(body).to_bytes(4, "little") + body
        need = self.end + len(buf)
        size = self.size
        if need > size:  # past the reserve: grow by another one, written as zeros in the same write
            size = -(-(need + LOG_CHECKPOINT_RECORDS * _LOG_REC.size) // _LOG_GROW) * _LOG_GROW
            buf += bytes(size - need)
        other: list[BaseException] = []

        def run_alongside() -> None:
            assert alongside is not None
            try:
                alongside()
            except BaseException as exc:  # noqa: BLE001 - raised again in the appending thread, after its own sync
                other.append(exc)

        helper = threading.Thread(target=run_alongside, name="cow-sync") if alongside is not None else None
        if helper is not None:
            helper.start()
        try:
            try:
                pwrite_full(self.fd, buf, self.end)
                os.fdatasync(self.fd)
            finally:
                if helper is not None:
                    helper.join()
            if other:
                raise other[0]
        except OSError:
            # The caller treats these rows as lost: never let a later open replay them. A reader would read on into
            # them, so they are zeroed (as far as a failing disk allows), and the next append starts a new
            # generation first, after which no record of this one is read again wherever it lies.
            self.stale_tail = True
            try:
                pwrite_full(self.fd, bytes(len(buf)), self.end)
            except OSError:
                pass
            raise
        self.size = size
        self.end = need
        self.rows.extend(rows)

    def reset(self, gen: int) -> None:
        """After a checkpoint committed generation ``gen``: start an empty log at the file's start. What is on disk
        is of older generations now, so it ends the log wherever it is met; the file keeps its blocks."""
        self.gen, self.rows, self.end, self.stale_tail = gen, [], 0, False

    def close(self) -> None:
        os.close(self.fd)


def _journal_mode_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> str:
    """Put a pool's database in WAL mode; its journal mode. On a new database another opener's transaction (a worker
    of serve --workers opening the pool at the same time) makes the switch fail with "database is locked" at once,
    without the busy handler's wait, so wait here, as long as the connection's busy timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Pool:
    """A snapshot pool: a directory with the chunk maps (``pool.db``, plus one map log per origin LUN) and one slot
    file per origin LUN.

    A map entry is durable once its record is in the LUN's map log (``lun-<id>.map``): one small fdatasync, at the
    same time as the pool file's, instead of a SQLite commit per batch. Records carry the log's generation and a CRC; a
    checkpoint moves them into ``pool.db`` and bumps the generation in the same transaction, so a crash at any point
    replays each record at most into rows that are already there (INSERT OR IGNORE) and never a stale one. Copies of
    a chunk that was a hole have no slot (``ZERO``): nothing to copy and nothing in the pool file to sync.

    ``capacity_bytes`` caps what the pool may hold (None: the filesystem's free space is the limit). Accounting is in
    the blocks of the pool files taken by the volumes open on it."""

    def __init__(self, name: str, path: str, capacity_bytes: int | None = None) -> None:
        self.name = name
        self.path = os.path.abspath(path)
        self.capacity_bytes = capacity_bytes
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.path, POOL_DB), isolation_level=None, check_same_thread=False,
                                   timeout=30.0)
        try:
            mode = _journal_mode_wal(self._db)
            if mode != "wal":
                raise StorageError(f"pool {name}: cannot use WAL journaling in {self.path} (got {mode!r})")
            # FULL: a checkpoint that returned is on stable storage, so its log may be emptied.
            self._db.execute("PRAGMA synchronous=FULL")
            self._create_tables()
        except BaseException:
            self._db.close()
            raise
        self._used: dict[int, int] = {}  # lun_id -> bytes held in its pool file's blocks
        self._logs: dict[int, _MapLog] = {}
        # Record rows durably (see _commit): an attribute, so that a test can watch the commits of this pool.
        self.commit: _Commit = self._commit
        # Why the pool takes no new copies (its map log cannot be checkpointed); None once a checkpoint succeeds.
        self.degraded: str | None = None

    def _create_tables(self) -> None:
        # One write transaction, taken at once (BEGIN IMMEDIATE waits out another's, up to the busy timeout): the
        # workers of serve --workers open a new pool together, and one's column check must not fall between the
        # other's CREATE and ALTER, or both add the column and the second fails (duplicate column name: mask).
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._create_tables_now()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _create_tables_now(self) -> None:
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS copies (lun_id INTEGER NOT NULL, chunk INTEGER NOT NULL, epoch INTEGER NOT "
            "NULL, slot INTEGER NOT NULL, PRIMARY KEY (lun_id, chunk, epoch), UNIQUE (lun_id, slot)) WITHOUT ROWID"
        )
        # Which units of the chunk the slot holds (FULL: all); a pool made before masks gets the column, all FULL.
        if "mask" not in {row[1] for row in self._db.execute("PRAGMA table_info(copies)")}:
            self._db.execute(f"ALTER TABLE copies ADD COLUMN mask INTEGER NOT NULL DEFAULT {FULL}")
        # Chunks that were holes when preserved: they read as zeros and take no slot.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS zero_copies (lun_id INTEGER NOT NULL, chunk INTEGER NOT NULL, epoch INTEGER "
            "NOT NULL, PRIMARY KEY (lun_id, chunk, epoch)) WITHOUT ROWID"
        )
        # The pieces of packed copies: the units in ``mask`` lie in the blocks from ``loc`` on, one unit each, in
        # order (a copy has a piece per batch that copied some of its units).
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS packed (lun_id INTEGER NOT NULL, chunk INTEGER NOT NULL, epoch INTEGER NOT "
            "NULL, loc INTEGER NOT NULL, mask INTEGER NOT NULL, PRIMARY KEY (lun_id, loc)) WITHOUT ROWID"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS packed_copy ON packed (lun_id, chunk, epoch)")
        self._db.execute("CREATE TABLE IF NOT EXISTS map_logs (lun_id INTEGER PRIMARY KEY, gen INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS invalid_epochs (lun_id INTEGER NOT NULL, epoch INTEGER NOT NULL, "
                         "PRIMARY KEY (lun_id, epoch)) WITHOUT ROWID")

    def data_path(self, lun_id: int) -> str:
        return os.path.join(self.path, f"lun-{lun_id}.cow")

    def log_path(self, lun_id: int) -> str:
        return os.path.join(self.path, f"lun-{lun_id}.map")

    def _log(self, lun_id: int) -> _MapLog:
        log_ = self._logs.get(lun_id)
        if log_ is None:
            with self._lock:
                log_ = self._logs.get(lun_id)
                if log_ is None:
                    row = self._db.execute("SELECT gen FROM map_logs WHERE lun_id = ?", (lun_id,)).fetchone()
                    log_ = self._logs[lun_id] = _MapLog(self.log_path(lun_id), row[0] if row else 0,
                                                              self.data_path(lun_id))
        return log_

    def _checkpoint(self, lun_id: int, log_: _MapLog) -> None:
        """Move the log's records into pool.db and start the next generation. Caller holds ``log_.lock``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # A copy's mask only grows (a later record of the same copy adds units), so replaying a record
                # twice, or an older one after a newer, leaves the union.
                self._db.executemany("INSERT INTO copies VALUES (?, ?, ?, ?, ?) ON CONFLICT (lun_id, chunk, epoch) "
                                     "DO UPDATE SET mask = mask | excluded.mask",
                                     [(lun_id, c, e, s, m) for c, e, s, m in log_.rows if s >= 0])
                self._db.executemany("INSERT OR IGNORE INTO packed VALUES (?, ?, ?, ?, ?)",
                                     [(lun_id, c, e, PACKED - s, m) for c, e, s, m in log_.rows if s <= PACKED])
                self._db.executemany("INSERT OR IGNORE INTO invalid_epochs VALUES (?, ?)",
                                     [(lun_id, e) for _, e, s, _ in log_.rows if s == INVALIDATED])
                self._db.executemany("INSERT OR IGNORE INTO zero_copies VALUES (?, ?, ?)",
                                     [(lun_id, c, e) for c, e, s, _ in log_.rows if s == ZERO])
                self._db.execute("INSERT INTO map_logs VALUES (?, ?) ON CONFLICT (lun_id) DO UPDATE SET gen = ?",
                                 (lun_id, log_.gen + 1, log_.gen + 1))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        log_.reset(log_.gen + 1)
        self.degraded = None

    def _rollback(self) -> None:
        # SQLite rolls a transaction back by itself on SQLITE_FULL and SQLITE_IOERR; a ROLLBACK then fails with "no
        # transaction is active", and that error would hide the real one.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def checkpoint(self, lun_id: int) -> None:
        """Fold ``lun_id``'s map log into pool.db now (it happens by itself every LOG_CHECKPOINT_RECORDS). Blocking."""
        log_ = self._log(lun_id)
        with log_.lock:
            if log_.rows or log_.stale_tail:
                self._checkpoint(lun_id, log_)

    def retry_checkpoints(self) -> bool:
        """A read-only pool tries its checkpoints again (space may have come back); True once it takes copies again.
        Blocking."""
        for lun_id in list(self._logs):
            try:
                self.checkpoint(lun_id)
            except (OSError, sqlite3.Error) as exc:
                self.degraded = f"cannot checkpoint lun {lun_id}'s map log into {POOL_DB}: {exc}"
                return False
        self.degraded = None
        log.info("pool %s takes copies again: its map logs are checkpointed", self.name)
        return True

    def load(self, lun_id: int) -> list[tuple[int, int, int, int]]:
        """Every ``(chunk, epoch, slot, mask)`` of ``lun_id`` (slot ``ZERO`` for a hole, whose mask is FULL), by
        chunk then epoch. Replays and checkpoints the map log first."""
        pending: list[tuple[int, int, int, int]] = []
        try:
            self.checkpoint(lun_id)
        except (OSError, sqlite3.Error) as exc:
            # A full pool (or a failing one) cannot fold the log in; the log is intact and its records are read from
            # memory instead. The pool takes no new copies until a checkpoint succeeds (see reserve).
            self.degraded = f"cannot checkpoint lun {lun_id}'s map log into {POOL_DB}: {exc}"
            log.error("pool %s is read-only: %s", self.name, self.degraded)
            pending = [r for r in self._log(lun_id).rows if r[2] != INVALIDATED]
        with self._lock:
            rows = list(self._db.execute(
                "SELECT chunk, epoch, slot, mask FROM copies WHERE lun_id = ? UNION ALL "
                f"SELECT chunk, epoch, {ZERO}, {FULL} FROM zero_copies WHERE lun_id = ? UNION ALL "
                f"SELECT chunk, epoch, {PACKED} - loc, mask FROM packed WHERE lun_id = ? ORDER BY 1, 2, 3 DESC",
                (lun_id, lun_id, lun_id)))
        if pending:
            # As a checkpoint would: one row per copy of the older layout, its mask the union of its records', and
            # one per piece of a packed copy.
            merged: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
            for c, e, slot, mask in rows + pending:
                key = (c, e, slot if slot <= PACKED else 0)
                had = merged.get(key)
                merged[key] = (c, e, slot, mask if had is None else had[3] | mask)
            rows = sorted(merged.values(), key=lambda r: (r[0], r[1], -r[2]))
        return rows

    def record_invalid(self, lun_id: int, epochs: Sequence[int]) -> None:
        """Durably note that snapshots ``epochs`` of ``lun_id`` lost a chunk (one map-log append and fdatasync), for
        when the catalog cannot take it. Blocking."""
        self.commit(lun_id, [(-1, e, INVALIDATED, FULL) for e in epochs])

    def invalid_epochs(self, lun_id: int) -> set[int]:
        """The epochs :meth:`record_invalid` noted, checkpointed or still in the log."""
        with self._lock:
            out = {int(r[0]) for r in self._db.execute("SELECT epoch FROM invalid_epochs WHERE lun_id = ?",
                                                         (lun_id,))}
        return out | {e for _, e, s, _ in self._log(lun_id).rows if s == INVALIDATED}

    def _commit(self, lun_id: int, rows: Sequence[tuple[int, int, int, int]],
                proofs: Sequence[tuple[int, int, int, int, int]] | None = None,
                sync_data: Callable[[], None] | None = None) -> None:
        """Record ``(chunk, epoch, slot, mask)`` rows durably (one append and fdatasync of the map log). A row for a
        copy already recorded adds its units. The slots' data is either durable already or made so by
        ``sync_data``, run at the same time as the log's fdatasync; ``proofs`` then carry each row's CRC of the
        bytes it copied (see :meth:`_MapLog._append`), by which an open tells whether they got there. Blocking."""
        log_ = self._log(lun_id)
        with log_.lock:
            if log_.stale_tail:
                self._checkpoint(lun_id, log_)
            log_.append(rows, proofs, sync_data)
            if len(log_.rows) >= LOG_CHECKPOINT_RECORDS:
                try:
                    self._checkpoint(lun_id, log_)
                except (OSError, sqlite3.Error) as exc:  # the rows are durable in the log; try again later
                    log.warning("pool %s: checkpoint of lun %d's map log failed: %s", self.name, lun_id, exc)

    def forget(self, lun_id: int, rows: Sequence[tuple[int, int]]) -> None:
        """Drop ``(chunk, epoch)`` rows in one durable transaction (after a checkpoint, so that no log record can
        bring them back). Blocking."""
        log_ = self._log(lun_id)
        with log_.lock:
            if log_.rows or log_.stale_tail:
                self._checkpoint(lun_id, log_)
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for table in ("copies", "zero_copies", "packed"):
                        self._db.executemany(f"DELETE FROM {table} WHERE lun_id = ? AND chunk = ? AND epoch = ?",
                                             [(lun_id, c, e) for c, e in rows])
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise

    def drop_lun(self, lun_id: int) -> None:
        """Forget every copy of ``lun_id`` and remove its pool file and map log (the LUN is gone). Blocking."""
        with self._lock:
            log_ = self._logs.pop(lun_id, None)
            for table in ("copies", "zero_copies", "packed", "map_logs", "invalid_epochs"):
                self._db.execute(f"DELETE FROM {table} WHERE lun_id = ?", (lun_id,))
            self._used.pop(lun_id, None)
        if log_ is not None:
            log_.close()
        for path in (self.data_path(lun_id), self.log_path(lun_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def set_used(self, lun_id: int, used_bytes: int) -> None:
        self._used[lun_id] = used_bytes

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def fs_free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    @property
    def free_bytes(self) -> int:
        """What the pool can still take: the cap minus use, and never more than the filesystem has."""
        free = self.fs_free_bytes
        if self.capacity_bytes is not None:
            free = min(free, max(0, self.capacity_bytes - self.used_bytes))
        return free

    def reserve(self, need: int) -> None:
        """Refuse new copies that would take the pool past its cap (ENOSPC from the filesystem is caught later)."""
        if self.degraded is not None:
            raise OutOfSpace(f"pool {self.name} is read-only: {self.degraded}")
        if self.capacity_bytes is not None and self.used_bytes + need > self.capacity_bytes:
            raise OutOfSpace(f"pool {self.name} is full ({self.used_bytes} of {self.capacity_bytes} bytes used)")

    def close(self) -> None:
        """Checkpoint every map log (a clean stop leaves them empty) and close. A failed checkpoint loses nothing:
        the next open replays the log."""
        for lun_id in list(self._logs):
            try:
                self.checkpoint(lun_id)
            except (OSError, sqlite3.Error) as exc:
                log.warning("pool %s: checkpoint of lun %d's map log at close failed: %s", self.name, lun_id, exc)
            self._logs.pop(lun_id).close()
        with self._lock:
            self._db.close()


# --- the copy-on-write volume ------------------------------------------------------------------------------------


class Origin(Protocol):
    """What the volume needs of its origin: a BlockDevice with a descriptor (FileBackend, BlockDevBackend)."""

    block_size: int
    num_blocks: int
    read_only: bool
    thin: bool

    def fileno(self) -> int: ...
    def file_extents(self, lba: int, blocks: int) -> list[FileExtent]: ...
    async def begin_copy(self, lba: int, blocks: int) -> int: ...
    async def read(self, lba: int, blocks: int) -> bytearray: ...
    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None: ...
    async def flush(self) -> None: ...
    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None: ...
    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]: ...
    async def resize(self, num_blocks: int) -> None: ...
    async def close(self) -> None: ...


InvalidHandler = Callable[[list[int], str], Awaitable[None]]


@dataclass(slots=True)
class _Item:
    """One chunk of a preservation batch: its slot (PACKED, or a slot of the older layout), the units to copy now,
    and the copy's mask once they are; a packed one's units go to the blocks from ``loc`` on."""

    chunk: int
    slot: int
    copy: int
    mask: int
    new: bool  # a new copy, else more units for this epoch's copy
    hole_ok: bool = True  # a new copy may be a ZERO record if the chunk is a hole (no later copy to hide)
    loc: int = -1


@dataclass(slots=True, eq=False)
class _Staged:
    """A write acknowledged before it reached the origin: its blocks, its data, and the preservations it waits for."""

    seq: int  # staging order: writes land on the origin in it
    lba: int
    end: int  # the block after its last
    data: bytes
    waits: list[asyncio.Future[None]]
    chunks: range


class CowVolume:
    """A LUN with differential snapshots: the origin, plus the preserved chunks of its snapshots in a pool.

    ``epochs`` are the epochs of the snapshots that still need copy-on-write (valid, and not a clone that has been
    filled). ``on_invalid(epochs, reason)`` is awaited when a preservation fails and must durably mark those
    snapshots invalid; the overwriting write waits for it. ``staging_bytes`` bounds the write-back staging of first
    writes (0: none, every first write waits for its preservation)."""

    def __init__(self, origin: Origin, pool: Pool | None, lun_id: int, chunk_size: int,
                 epochs: Iterable[int] = (), on_invalid: InvalidHandler | None = None, name: str = "",
                 staging_bytes: int = 0) -> None:
        if chunk_size <= 0 or chunk_size % origin.block_size:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of the block size {origin.block_size}")
        self.origin = origin
        self._origin_inline: Callable[[int, Buffer], bool] | None = None
        self.block_size = self._bs = origin.block_size
        self.read_only = origin.read_only
        self.thin = origin.thin
        self.num_blocks = origin.num_blocks
        self.reopen(origin)
        self.name = name or str(lun_id)
        self.lun_id = lun_id
        self.chunk_size = chunk_size
        self.stats = CowStats()
        self.on_invalid = on_invalid
        self._epochs: list[int] = sorted(set(epochs))
        self._newest = self._epochs[-1] if self._epochs else 0
        self._top = self._newest  # the highest epoch ever set here or carried by a copy (see epoch_floor)
        self._copies: dict[int, list[tuple[int, int]]] = {}  # chunk -> [(epoch, slot)], ascending epochs
        # Copies are made per unit of the chunk (4 KiB, or a 64th of a larger chunk): a copy's mask says which units
        # its slot holds. Only masks other than FULL are kept here, so a chunk copied whole costs no entry.
        unit = max(4096, chunk_size // 64)
        self.unit = unit if chunk_size % unit == 0 and unit % origin.block_size == 0 else chunk_size
        self._full = (1 << (chunk_size // self.unit)) - 1
        self._masks: dict[tuple[int, int], int] = {}  # (chunk, epoch) -> mask, when not FULL
        # Where a packed copy's units lie: (chunk, epoch) -> [(units, first block)], one piece per batch.
        self._places: dict[tuple[int, int], list[tuple[int, int]]] = {}
        # The pool file in blocks of one unit: the free runs below _end, (first block, blocks) by block.
        self._free: list[tuple[int, int]] = []
        self._end = 0
        self._leaked = 0  # copies freed that the pool could not forget: their blocks stay taken until a reopen
        self._pool: Pool | None = None
        self._data_fd = -1
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._pending: dict[int, tuple[int, asyncio.Future[None]]] = {}  # chunk -> (units wanted, future)
        self._runner: asyncio.Task[None] | None = None
        # What a batch runs in its thread (see _copy_now): an attribute, so that a test can hold a batch's copy
        # (a compiled class's methods cannot be replaced).
        self._copy_and_commit: Callable[[Pool, list[_Item], int], tuple[list[_Item], dict[int, str]]] = \
            self._copy_now
        self._active = 0
        # Writes the origin sent to its threads, from their last check until the origin has them: id -> (first
        # chunk, last chunk), ids increasing, so the first key is the oldest (see _write_through and hold_nowait).
        self._landing: dict[int, tuple[int, int]] = {}
        self._landing_ids = 0
        self._landing_waiters: list[asyncio.Future[None]] = []
        # Per snapshot taken while such writes were landing: the newest of them (its contents settle once they land).
        self._unsettled: dict[int, int] = {}
        self._gate: asyncio.Event | None = None
        self._drained: asyncio.Future[None] | None = None
        self._closed = False
        # Write-back staging (see write): acknowledged writes not yet on the origin, in order, and by chunk.
        self.staging_bytes = staging_bytes
        self._staged: collections.deque[_Staged] = collections.deque()
        self._staged_at: dict[int, list[_Staged]] = {}
        self._stage_seq = 0  # the last write staged
        self._landed_seq = 0  # every staged write up to this one has reached the origin
        # (seq, tiebreak, future) as a heap: landing a write wakes only the waiters it concerns, however many wait
        self._land_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_ids = itertools.count()
        self._lander: asyncio.Task[None] | None = None
        self._stage_paused = 0
        # A staged write that could not reach the origin: reported by the next flush (SYNCHRONIZE CACHE).
        self._stage_error: StorageError | None = None
        # Why the pool holding this LUN's copies could not be opened (None: it was, or there is none). Until it is,
        # the maps are unknown: every snapshot view refuses to read, and the first write that needs a copy
        # invalidates the snapshots instead, so the origin keeps serving.
        self.pool_unavailable: str | None = None
        if pool is not None:
            self.attach_pool(pool)

    # --- pool and maps --------------------------------------------------------------------------------------------

    @property
    def pool(self) -> Pool | None:
        return self._pool

    def attach_pool(self, pool: Pool) -> None:
        """Open this LUN's pool file in ``pool`` and load its maps; copies no live snapshot needs are freed."""
        if self._pool is not None:
            if self._pool is pool:
                return
            raise ValueError(f"lun {self.name} already keeps its copies in pool {self._pool.name}")
        fd = os.open(pool.data_path(self.lun_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            rows = pool.load(self.lun_id)
        except BaseException:
            os.close(fd)
            raise
        self._data_fd = fd
        self._pool = pool
        self.pool_unavailable = None
        full, per_slot = self._full, self.chunk_size // self.unit
        used: list[tuple[int, int]] = []  # (first block, blocks)
        packed: dict[tuple[int, int], int] = {}  # a packed copy's units: the union of its pieces'
        for chunk, epoch, slot, mask in rows:
            if slot <= PACKED:
                key, units, loc = (chunk, epoch), mask & full, PACKED - slot
                if key not in packed:
                    packed[key] = 0
                    self._copies.setdefault(chunk, []).append((epoch, PACKED))
                    self._places[key] = []
                packed[key] |= units
                self._places[key].append((units, loc))
                used.append((loc, units.bit_count()))
            else:
                self._copies.setdefault(chunk, []).append((epoch, slot))
                if mask & full != full:
                    self._masks[(chunk, epoch)] = mask
                if slot != ZERO:
                    used.append((slot * per_slot, per_slot))
            self._top = max(self._top, epoch)
        for key, units in packed.items():
            if units != full:
                self._masks[key] = units
        self._free, self._end = [], 0
        for start, n in sorted(used):
            if start > self._end:
                self._free.append((self._end, start - self._end))
            self._end = max(self._end, start + n)
        self._account()
        garbage = self._unneeded()
        if garbage:
            self._free_now(garbage)

    def detach_pool(self) -> Pool | None:
        """Let go of the pool once no snapshot needs copy-on-write (its pool file is then empty)."""
        if self._pool is None or self._epochs or self._copies:
            return None
        pool, self._pool = self._pool, None
        os.close(self._data_fd)
        self._data_fd = -1
        pool.set_used(self.lun_id, 0)
        return pool

    def close_pool(self) -> None:
        """Close the pool file (the daemon is stopping, or the LUN is going away). Not for use while writes run."""
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        if self._pool is not None:
            self._pool.set_used(self.lun_id, 0)
        self._pool = None

    def _account(self) -> None:
        if self._pool is not None:
            self._pool.set_used(self.lun_id, (self._end - sum(n for _, n in self._free)) * self.unit)

    @property
    def epochs(self) -> tuple[int, ...]:
        return tuple(self._epochs)

    @property
    def epoch_floor(self) -> int:
        """A new snapshot's epoch must be above this: the newest epoch this volume was given, and the newest any copy
        carries. A snapshot set releases writes before its catalog record commits, so copies may be tagged with an
        epoch that never commits (a crash, a failed commit); such a copy legitimately serves older snapshots, and
        must never be taken for a copy of a later snapshot that reused its epoch."""
        return self._top

    @property
    def slots_used(self) -> int:
        """Copies that hold data in the pool (not those of holes), counting those freed but not yet forgotten."""
        return sum(1 for cl in self._copies.values() for _, slot in cl if slot != ZERO) + self._leaked

    def _alloc(self, n: int) -> int:
        """The first of ``n`` consecutive free blocks of the pool file: the first free run long enough, else the
        file's end (a batch's copies are one append, one extent)."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, length - n)
                return start
        start = self._end
        self._end += n
        return start

    def _give(self, start: int, n: int) -> None:
        """Blocks ``start`` to ``start + n`` are free again (their map rows are durably gone, or were never
        written), joined to the runs next to them."""
        i = bisect.bisect_left(self._free, (start, 0))
        if i < len(self._free) and self._free[i][0] == start + n:
            n += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            start, n = self._free[i - 1][0], self._free[i - 1][1] + n
            i -= 1
            del self._free[i]
        if start + n == self._end:
            self._end = start
        else:
            self._free.insert(i, (start, n))

    def _blocks_of(self, chunk: int, epoch: int, slot: int) -> list[tuple[int, int]]:
        """The pool file's ``(first block, blocks)`` runs that a copy's units take."""
        if slot == ZERO:
            return []
        if slot != PACKED:
            per_slot = self.chunk_size // self.unit
            return [(slot * per_slot, per_slot)]
        return [(loc, units.bit_count()) for units, loc in self._places.get((chunk, epoch), ())]

    def _unit_at(self, chunk: int, epoch: int, slot: int, u: int) -> int:
        """Where unit ``u`` of a copy is in the pool file (bytes), or ZERO."""
        if slot == ZERO:
            return ZERO
        if slot != PACKED:
            return slot * self.chunk_size + u * self.unit
        for units, loc in self._places[(chunk, epoch)]:
            if units >> u & 1:
                return (loc + (units & ((1 << u) - 1)).bit_count()) * self.unit
        raise KeyError(f"unit {u} of chunk {chunk}'s copy for epoch {epoch} has no place")

    def pieces(self, chunk: int, epoch: int) -> list[tuple[int, int, int | None]]:
        """Where snapshot ``epoch``'s contents of ``chunk`` are: ``(offset in the chunk, length, source)`` pieces
        covering the whole chunk, the source being where the piece starts in the pool file (bytes), ``ZERO`` (it
        was a hole: zeros) or None (the origin still holds it). Each unit comes from the earliest copy with epoch
        >= ``epoch`` that holds it."""
        cs = self.chunk_size
        cl = self._copies.get(chunk)
        if not cl or cl[-1][0] < epoch:
            return [(0, cs, None)]
        masks = self._masks
        found = [(e, slot, masks.get((chunk, e), FULL)) for e, slot in cl if e >= epoch]
        if found[0][2] == FULL and found[0][1] != PACKED:
            return [(0, cs, self._unit_at(chunk, found[0][0], found[0][1], 0))]
        unit = self.unit
        out: list[tuple[int, int, int | None]] = []
        for u in range(cs // unit):
            src = next((self._unit_at(chunk, e, slot, u) for e, slot, mask in found if mask >> u & 1), None)
            if out:
                prev = out[-1][2]
                if src == prev and (src is None or src == ZERO) or (
                        src is not None and src >= 0 and prev is not None and prev >= 0 and prev + out[-1][1] == src):
                    out[-1] = (out[-1][0], out[-1][1] + unit, prev)
                    continue
            out.append((u * unit, unit, src))
        return out

    def changed_chunks(self, epoch: int) -> set[int]:
        """Chunks changed on the origin since snapshot ``epoch`` (for "copy only what changed")."""
        return {c for c, cl in self._copies.items() if cl[-1][0] >= epoch}

    def mapped_chunks(self, epoch: int) -> int:
        """How many preserved chunks snapshot ``epoch`` reads from slots (its space in the pool, shared copies
        included; chunks that were holes take none)."""
        return sum(1 for c in self.changed_chunks(epoch)
                   if any(src is not None and src != ZERO for _, _, src in self.pieces(c, epoch)))

    def _unneeded(self) -> list[tuple[int, int, int]]:
        """Copies no live snapshot reads: (chunk, epoch, slot). A whole-chunk copy serves the snapshots in
        (previous copy's epoch, epoch]; where a chunk has partial copies, a snapshot may read a unit from any later
        copy, so each live snapshot's units are followed through the copies."""
        live = self._epochs
        masks = self._masks
        out: list[tuple[int, int, int]] = []
        for chunk, cl in self._copies.items():
            if any((chunk, e) in masks for e, _ in cl):
                needed: set[int] = set()
                for s in live:
                    covered = 0
                    for e, _ in cl:
                        if e >= s:
                            mask = masks.get((chunk, e), FULL)
                            if mask & ~covered & self._full:
                                needed.add(e)
                            covered |= mask
                            if covered & self._full == self._full:
                                break
                out.extend((chunk, e, slot) for e, slot in cl if e not in needed)
                continue
            prev = 0
            for e, slot in cl:
                i = bisect.bisect_right(live, prev)
                if not (i < len(live) and live[i] <= e):
                    out.append((chunk, e, slot))
                prev = e
        return out

    def _free_now(self, garbage: list[tuple[int, int, int]]) -> None:
        """Forget copies (durably first), then make their slots reusable and give the space back. Blocking."""
        assert self._pool is not None
        try:
            self._pool.forget(self.lun_id, [(c, e) for c, e, _ in garbage])
        except (OSError, sqlite3.Error) as exc:
            self._give_back_unrecorded(garbage, exc)
            return
        self._release_slots(garbage)

    def _give_back_unrecorded(self, garbage: list[tuple[int, int, int]], exc: BaseException) -> None:
        """The pool could not record that these copies are gone (it is full, typically): give their space back
        anyway, since no live snapshot reads them, but never reuse their slots, whose old map rows may still be in
        pool.db (a new copy there would be shadowed by them); the next open frees them for good."""
        runs = [r for c, e, slot in garbage for r in self._blocks_of(c, e, slot)]
        self._leaked += sum(1 for _, _, slot in garbage if slot != ZERO)
        self._drop_copies(garbage)
        for start, n in runs:
            punch(self._data_fd, start * self.unit, n * self.unit)
        log.warning("lun %s: %d unneeded copies freed, but pool %s could not record it (%s); their slots stay unused "
                    "until it reopens", self.name, len(garbage), self._pool.name if self._pool else "?", exc)

    def _drop_copies(self, garbage: list[tuple[int, int, int]]) -> None:
        for chunk, e, slot in garbage:
            cl = self._copies.get(chunk)
            if cl is not None:
                cl.remove((e, slot))
                if not cl:
                    del self._copies[chunk]
            self._masks.pop((chunk, e), None)
            self._places.pop((chunk, e), None)

    def _release_slots(self, garbage: list[tuple[int, int, int]]) -> None:
        runs = [r for c, e, slot in garbage for r in self._blocks_of(c, e, slot)]
        self._drop_copies(garbage)
        if not self._copies:
            # Nothing preserved any more: give the whole file back.
            self._free, self._end, self._leaked = [], 0, 0
            os.ftruncate(self._data_fd, 0)
        else:
            for start, n in runs:
                punch(self._data_fd, start * self.unit, n * self.unit)
                self._give(start, n)
        self._account()

    # --- snapshots come and go ------------------------------------------------------------------------------------

    async def hold(self) -> None:
        """Hold new writes and wait for in-flight ones to finish, those on the origin's threads included. Pair with
        :meth:`release`; a cancelled hold releases itself."""
        if not self.hold_nowait():
            await self.drain()
        try:
            await self.settle(self._landing_ids)
        except BaseException:
            self.release()
            raise

    def hold_nowait(self) -> bool:
        """Hold new writes at once, without yielding; True when nothing is in flight (the hold is complete), else
        :meth:`drain` must be awaited. Holding several volumes in one step is what lets a snapshot set fix its
        point in time without a trip through the event loop (unmaps and resizes count as in flight, and staged writes
        until they reach the origin).

        A write the origin sent to its threads does not count, though it may still land: it passed its last check,
        so whatever it overwrites was preserved for every snapshot before this hold, and a snapshot added now
        contains it (it was in flight: either side of the instant is right), as it would had the hold waited. Those
        writes are many and slow exactly when a LUN's page-cache writes stall (they go to the threads after a
        stall, 64 queued on 4 threads), and waiting for them held a set's writes for tens of milliseconds. What
        must wait for them instead: a preservation of their chunks (the copy must hold what they write, see
        :meth:`_copy_batch`) and the readers of the snapshot (:meth:`settle`, which the snapshot service awaits
        before it records the set; :meth:`SnapshotView.read`)."""
        if self._gate is not None:
            raise RuntimeError(f"lun {self.name} is already held")
        self._gate = asyncio.Event()
        return not self._active and not self._staged

    async def drain(self) -> None:
        """Wait until what was in flight when :meth:`hold_nowait` closed the gate has finished, staged writes
        included: a snapshot taken with writes still staged would see their blocks' old contents, though they were
        acknowledged before it."""
        try:
            while self._active or self._staged:
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained
        except BaseException:
            self.release()
            raise
        finally:
            self._drained = None

    async def settle(self, upto: int) -> None:
        """Wait until every write the origin's threads were given up to number ``upto`` has landed (or failed)."""
        while self._landing and next(iter(self._landing)) <= upto:
            fut = asyncio.get_running_loop().create_future()
            self._landing_waiters.append(fut)
            await fut

    @property
    def landing(self) -> int:
        """Writes given to the origin's threads that have not landed yet (see :meth:`hold_nowait`)."""
        return len(self._landing)

    def settled(self, epoch: int) -> bool:
        """Whether snapshot ``epoch``'s contents are final: the writes that were landing on the origin's threads
        when it was taken (it contains them) have landed."""
        mark = self._unsettled.get(epoch)
        if mark is None:
            return True
        if self._landing and next(iter(self._landing)) <= mark:
            return False
        del self._unsettled[epoch]
        return True

    async def settle_snapshot(self, epoch: int) -> None:
        """Wait until snapshot ``epoch`` is :meth:`settled`; before then nothing may read it."""
        mark = self._unsettled.get(epoch)
        if mark is not None:
            await self.settle(mark)
            self._unsettled.pop(epoch, None)

    async def _after_landing(self, chunks: set[int]) -> None:
        """Wait until no write that was landing on the origin's threads when called touches ``chunks``."""
        upto = self._landing_ids
        while any(i <= upto and any(c in chunks for c in range(lo, hi + 1))
                  for i, (lo, hi) in self._landing.items()):
            fut = asyncio.get_running_loop().create_future()
            self._landing_waiters.append(fut)
            await fut

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    @property
    def held(self) -> bool:
        return self._gate is not None

    def add_snapshot(self, epoch: int) -> None:
        """Start preserving for snapshot ``epoch`` (above :attr:`epoch_floor`). Call while held: that instant is the
        snapshot's point in time. Writes may be released before the catalog records it (a crash then leaves copies
        tagged ``epoch`` that only older snapshots use, or nobody: :meth:`attach_pool` frees those); if recording
        fails, call :meth:`abandon_snapshot`."""
        if self._pool is None:
            raise ValueError(f"lun {self.name} has no pool for its copies")
        if epoch <= self._top:
            raise ValueError(f"epoch {epoch} is not above {self._top}")
        self._epochs.append(epoch)
        self._newest = self._top = epoch
        if self._landing:
            self._unsettled[epoch] = self._landing_ids

    def forget_epoch(self, epoch: int) -> None:
        """Undo :meth:`add_snapshot` while still held (no write has seen the epoch, so nothing was preserved)."""
        self._drop(epoch)

    async def abandon_snapshot(self, epoch: int) -> int:
        """Undo :meth:`add_snapshot` when the snapshot could not be recorded: stop preserving for it and free the
        copies only it needed (``epoch`` stays used: :attr:`epoch_floor` does not go back). Holds writes briefly."""
        await self.hold()
        try:
            return await self.drop_snapshot(epoch)
        finally:
            self.release()

    async def drop_snapshot(self, epoch: int) -> int:
        """Stop preserving for ``epoch`` (deleted, invalid, or a filled clone) and free the copies no remaining
        snapshot maps to. Returns the number of chunks freed. Call while held, after the catalog says so."""
        self._drop(epoch)
        garbage = self._unneeded()
        if garbage and self._pool is not None:
            try:
                await asyncio.to_thread(self._pool.forget, self.lun_id, [(c, e) for c, e, _ in garbage])
            except (OSError, sqlite3.Error) as exc:
                self._give_back_unrecorded(garbage, exc)
                return len(garbage)
            self._release_slots(garbage)
        return len(garbage)

    def _drop(self, epoch: int) -> None:
        if epoch in self._epochs:
            self._epochs.remove(epoch)
        self._unsettled.pop(epoch, None)
        self._newest = self._epochs[-1] if self._epochs else 0

    def view(self, epoch: int, num_blocks: int | None = None) -> SnapshotView:
        """A read-only BlockDevice of snapshot ``epoch`` (``num_blocks``: its size when taken)."""
        return SnapshotView(self, epoch, self.origin.num_blocks if num_blocks is None else num_blocks)

    # --- BlockDevice ----------------------------------------------------------------------------------------------

    # The geometry is copied from the origin into plain attributes, not delegated through properties: a WRITE reads
    # three of them per command and this class is interpreted. They follow the origin through reopen and resize, the
    # only ways it changes.

    def reopen(self, origin: Origin) -> None:
        """Put ``origin`` (the same LUN's backend, opened again with other flags) under this volume: same maps, same
        state; its length, flags and inline write are taken from it (the block size is the LUN's, fixed)."""
        self.origin = origin
        # The origin's inline write, when it has one (see write_inline): looked up once, not per write.
        self._origin_inline = origin.write_inline if isinstance(origin, InlineWrite) else None
        self.read_only = origin.read_only
        self.thin = origin.thin
        self.num_blocks = origin.num_blocks

    def fileno(self) -> int:
        return self.origin.fileno()

    def read(self, lba: int, blocks: int) -> Coroutine[Any, Any, Buffer]:
        # The origin's own coroutine, not one wrapped in another: with nothing staged a read never needs the volume
        # (snapshots only change what a write must do first), and this runs once per READ command.
        if not self._staged:
            return self.origin.read(lba, blocks)
        return self._read_staged(lba, blocks)

    async def _read_staged(self, lba: int, blocks: int) -> bytearray:
        """Read the origin, then lay the staged writes over it, oldest first. The staged writes taken are those
        found before the origin read and after it: one that lands meanwhile may or may not be in what the origin
        read returned, and its data is what those blocks hold either way (a write that overlaps a staged one is
        staged behind it, never written to the origin first)."""
        end = lba + blocks
        before = self._staged_over(lba, end)
        buf = await self.origin.read(lba, blocks)
        if not isinstance(buf, bytearray):
            buf = bytearray(buf)
        found = {e.seq: e for e in before}
        found.update((e.seq, e) for e in self._staged_over(lba, end))
        bs = self.origin.block_size
        for _, e in sorted(found.items()):
            lo, hi = max(lba, e.lba), min(end, e.end)
            buf[(lo - lba) * bs:(hi - lba) * bs] = e.data[(lo - e.lba) * bs:(hi - e.lba) * bs]
        return buf

    def _units(self, chunk: int, start: int, end: int) -> int:
        """The mask of the units of ``chunk`` that the byte range ``[start, end)`` touches."""
        base = chunk * self.chunk_size
        lo = (max(start, base) - base) // self.unit
        hi = (min(end, base + self.chunk_size) - 1 - base) // self.unit
        return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)

    def _covered(self, chunk: int, epoch: int) -> int:
        """The units of ``chunk`` that snapshot ``epoch`` reads from a copy (any copy with epoch >= ``epoch``): an
        overwrite of the others would change it. Copies above the newest epoch exist when their snapshots went away
        (deleted, or a clone that filled) while older ones stayed."""
        covered = 0
        for e, _ in reversed(self._copies.get(chunk, ())):
            if e < epoch:
                break
            covered |= self._masks.get((chunk, e), FULL)
        return covered

    def _needs(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ``(chunk, units)`` that the byte range ``[start, end)`` must preserve first for the newest epoch."""
        newest = self._newest
        copies = self._copies
        out = []
        for c in range(start // self.chunk_size, (end - 1) // self.chunk_size + 1):
            want = self._units(c, start, end)
            cl = copies.get(c)
            if cl is None or cl[-1][0] < newest or c in self._inflight or self._covered(c, newest) & want != want:
                out.append((c, want))
        return out

    async def _wait_gate(self) -> None:
        while self._gate is not None:
            await self._gate.wait()

    async def _enter(self) -> None:
        await self._wait_gate()
        self._active += 1

    def _leave(self) -> None:
        self._active -= 1
        if not self._active:
            self._wake_drain()

    def _wake_drain(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def write(self, lba: int, data: Buffer, fua: bool = False) -> Coroutine[Any, Any, None]:
        """Preserve the chunks this write is the first to change since the newest snapshot, then write. Durability
        as the origin's ``write``; the preserved copies are durable before the origin is touched.

        A write with nothing to preserve, nothing staged and no hold lands in this call, through the origin's inline
        write (no ``await`` between the check and the ``pwritev``), and what is returned only finishes it (a FUA
        write's flush). With every unit it touches preserved a write then costs a plain write plus a dict lookup and
        a mask test. When the origin sends its writes to its threads, the write takes the counted path instead.

        The last check and the origin's ``pwritev`` run with no ``await`` between them, so a snapshot taken while
        this write waits for its preservation is seen by the re-check (the chunk then needs a copy for the new epoch
        too), and a hold never has to wait for preservations in flight: only for what has passed its check.

        Write-back staging (``staging_bytes`` > 0, a write without FUA: the initiator was told the cache is on, so an
        unflushed write may be lost). A first write is then acknowledged once it is queued behind its preservation:
        the origin still holds the old data that the batch copies, and nothing writes those blocks of the origin
        before the batch's copy and map record are durable, because the write is held here (the staging area) until
        then and lands from here, in order. Reads see it at once (:meth:`read` lays it over the origin). A write that
        overlaps a staged one is staged behind it; one that may not be staged (FUA, too large, staging paused) waits
        until the staged writes it overlaps have landed, and a FUA write, like :meth:`flush`, until every write staged
        before it has. Past ``staging_bytes`` a write waits for room (back-pressure, never an error)."""
        if self._gate is None and not self._staged:
            nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
            inline = self._origin_inline
            if inline is not None and self._clear(lba * self._bs, nbytes):
                # Only a write that lands right here may skip the in-flight count: one that the origin sends to its
                # threads (a store that may hang, or after a stall) yields before it lands, and a hold must wait
                # for it (see _write_through).
                try:
                    landed = inline(lba, data)
                except (StorageError, ValueError) as exc:  # raised when awaited, as from the coroutine it stands for
                    return _failed(exc)
                if landed:
                    return self.origin.flush() if fua else _nothing()
        return self._write(lba, data, fua)

    async def _write(self, lba: int, data: Buffer, fua: bool) -> None:
        """:meth:`write` when it may have to preserve, stage or wait."""
        bs = self._bs
        nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
        start = lba * bs
        end = lba + nbytes // bs
        waited = waited_room = False
        while True:
            if self._gate is not None:
                await self._wait_gate()
            if not nbytes:
                break
            if fua and not waited and self._stage_seq > self._landed_seq:
                waited = True
                await self._landed(self._stage_seq)
                continue
            over = self._staged_top(lba, end) if self._staged else 0
            if not fua and self.staging_bytes and not self._stage_paused and nbytes <= self.staging_bytes:
                need = self._need(start, nbytes)
                if not (need or over):
                    break
                if self._staged and self.stats.staged_bytes + nbytes > self.staging_bytes:
                    if not waited_room:
                        waited_room = True
                        self.stats.stage_waits += 1
                    await self._landed(self._staged[0].seq)
                    continue
                self._stage(lba, end, data, need)
                return
            if not over:
                break
            await self._landed(over)
        await self._write_through(lba, data, start, nbytes)
        if fua:
            await self.origin.flush()

    def write_inline(self, lba: int, data: Buffer) -> bool:
        """:class:`~lunsync.snapshots.device.InlineWrite`: the origin's inline write, when :meth:`write` without FUA
        would do nothing but call the origin's ``write``: no hold is up, nothing is staged, and the newest snapshot
        needs no copy of these blocks. False otherwise, with nothing written (the caller then awaits :meth:`write`)."""
        inline = self._origin_inline
        if inline is None or self._gate is not None or self._staged:
            return False
        if self._newest:  # with no snapshot nothing needs preserving: _clear's first test, without the call
            start = lba * self._bs
            nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
            if not self._clear(start, nbytes) and self._needs(start, start + nbytes):
                return False
        return inline(lba, data)

    async def _write_through(self, lba: int, data: Buffer, start: int, nbytes: int) -> None:
        """Preserve what the write needs for the newest epoch, then write the origin's page cache (no FUA)."""
        while True:
            while need := self._need(start, nbytes):
                await self._preserve(need)
            if self._gate is None:
                break
            # A hold closed while this write waited for its copy: it does not count the write (see hold_nowait),
            # so the write must not land until the hold is released, and then it checks again against the epoch
            # the hold may have added.
            await self._wait_gate()
        # From the last check to the page cache without yielding when the origin writes inline; a FUA write's flush
        # comes after, and the data it waits for is already in the origin. An origin whose writes go to its threads
        # now (a store that may hang, or for a while after a stall) yields before its data lands: from here the
        # write is landing, and a snapshot taken meanwhile contains it; its chunks are not copied for that
        # snapshot, nor the snapshot read, before it has landed (see hold_nowait).
        inline = self._origin_inline
        if inline is not None and inline(lba, data):
            return
        self._landing_ids += 1
        wid = self._landing_ids
        cs = self.chunk_size
        self._landing[wid] = (start // cs, (start + nbytes - 1) // cs)
        try:
            await self.origin.write(lba, data, False)
        finally:
            del self._landing[wid]
            if self._landing_waiters:
                waiters, self._landing_waiters = self._landing_waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)

    def _need(self, start: int, nbytes: int) -> list[tuple[int, int]]:
        """What a write of ``nbytes`` at byte ``start`` must preserve first (nothing without snapshots)."""
        if self._clear(start, nbytes):
            return []
        return self._needs(start, start + nbytes)

    def _clear(self, start: int, nbytes: int) -> bool:
        """Whether a write of ``nbytes`` at byte ``start`` surely has nothing to preserve first (False: look with
        :meth:`_needs`). The common cases cost no call: no snapshot, or one chunk whose newest copy (for the newest
        epoch) holds every unit the write touches, a dict lookup or two and a mask test."""
        newest = self._newest
        if not newest or not nbytes:
            return True
        cs = self.chunk_size
        first = start // cs
        if first == (start + nbytes - 1) // cs and first not in self._inflight:
            cl = self._copies.get(first)
            if cl is not None and cl[-1][0] >= newest:
                mask = self._masks.get((first, cl[-1][0]))
                if mask is None:
                    return True
                base = first * cs
                unit = self.unit
                lo = (start - base) // unit
                want = ((1 << ((start + nbytes - 1 - base) // unit + 1)) - 1) & ~((1 << lo) - 1)
                return mask & want == want
        return False

    # --- write-back staging ---------------------------------------------------------------------------------------

    def _stage(self, lba: int, end: int, data: Buffer, need: list[tuple[int, int]]) -> None:
        """Hold an acknowledged write until its preservations are durable; it then lands on the origin in order."""
        self._stage_seq += 1
        cs, bs = self.chunk_size, self.origin.block_size
        # A copy: the command's buffer goes back to its connection once the write is answered.
        e = _Staged(self._stage_seq, lba, end, bytes(data), self._request(need) if need else [],
                    range(lba * bs // cs, (end * bs - 1) // cs + 1))
        self._staged.append(e)
        for c in e.chunks:
            self._staged_at.setdefault(c, []).append(e)
        self.stats.staged_bytes += len(e.data)
        self.stats.staged_writes += 1
        if self._lander is None or self._lander.done():
            self._lander = asyncio.get_running_loop().create_task(self._land(), name=f"cow-land-{self.name}")

    def _staged_over(self, lba: int, end: int) -> list[_Staged]:
        """The staged writes that overlap blocks ``[lba, end)``."""
        cs, bs = self.chunk_size, self.origin.block_size
        out: list[_Staged] = []
        if not self._staged or end <= lba:
            return out
        at = self._staged_at
        for c in range(lba * bs // cs, (end * bs - 1) // cs + 1):
            for e in at.get(c, ()):
                if e.lba < end and lba < e.end and e not in out:
                    out.append(e)
        return out

    def _staged_top(self, lba: int, end: int) -> int:
        """The order of the newest staged write overlapping blocks ``[lba, end)``; 0 if none."""
        return max((e.seq for e in self._staged_over(lba, end)), default=0)

    async def _landed(self, seq: int) -> None:
        """Wait until every write staged up to ``seq`` has reached the origin (or failed to, see :meth:`flush`)."""
        while self._landed_seq < seq:
            fut = asyncio.get_running_loop().create_future()
            heapq.heappush(self._land_waiters, (seq, next(self._waiter_ids), fut))
            await fut

    async def _land(self) -> None:
        """Write the staged writes to the origin, oldest first, each once its preservations are durable (every one
        is checked again, as a direct write is: a snapshot may have been taken meanwhile, or a copy failed)."""
        bs = self.origin.block_size
        landed = 0
        while self._staged:
            e = self._staged[0]
            try:
                for fut in e.waits:
                    if not fut.done():
                        await asyncio.shield(fut)
                    fut.result()
                start = e.lba * bs
                if self._clear(start, len(e.data)):  # its copy is durable: the origin's write, with no frame around
                    await self.origin.write(e.lba, e.data, False)
                else:
                    await self._write_through(e.lba, e.data, start, len(e.data))
            except Exception as exc:  # noqa: BLE001 - never write unpreserved; the next flush reports the loss
                err = exc if isinstance(exc, StorageError) else StorageError(str(exc))
                log.error("lun %s: a staged write of %d block(s) at %d did not reach the origin: %s", self.name,
                          e.end - e.lba, e.lba, exc)
                self._stage_error = err
            self._staged.popleft()
            for c in e.chunks:
                at = self._staged_at[c]
                at.remove(e)
                if not at:
                    del self._staged_at[c]
            self.stats.staged_bytes -= len(e.data)
            self._landed_seq = e.seq
            waiters = self._land_waiters
            while waiters and waiters[0][0] <= e.seq:
                fut = heapq.heappop(waiters)[2]
                if not fut.done():
                    fut.set_result(None)
            landed += 1
            if landed % _LAND_YIELD == 0:
                await asyncio.sleep(0)  # a large batch lands without holding every other session's commands
        self._wake_drain()

    def pause_staging(self) -> None:
        """Stop staging new writes (they take the direct path) until :meth:`resume_staging`; pair them. A snapshot
        set pauses, waits for :meth:`land_staged`, then holds: the hold itself then stays short."""
        self._stage_paused += 1

    def resume_staging(self) -> None:
        self._stage_paused -= 1

    async def land_staged(self) -> None:
        """Wait until every write staged so far has reached the origin."""
        await self._landed(self._stage_seq)

    @property
    def staged(self) -> int:
        """Writes acknowledged and held in the staging area now."""
        return len(self._staged)

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Preserve the chunks the ranges touch (a deallocation is a change), then unmap. The unmap runs in a thread,
        so it counts as in flight from its last check until it lands, and a hold waits for it. Staged writes to the
        ranges land first: they were acknowledged before the unmap, and landing after it would bring data back."""
        bs = self.origin.block_size
        while True:
            await self._wait_gate()
            if self._staged:
                top = max((self._staged_top(lba, lba + blocks) for lba, blocks in ranges), default=0)
                if top:
                    await self._landed(top)
                    continue
            need: list[tuple[int, int]] = []
            if self._newest:
                for lba, blocks in ranges:
                    if blocks and 0 <= lba and lba + blocks <= self.origin.num_blocks:
                        need += self._needs(lba * bs, (lba + blocks) * bs)
            if not need:
                break
            await self._preserve(need)
        self._active += 1  # no await since the last check and the gate: a hold now waits for this unmap
        try:
            await self.origin.unmap(ranges)
        finally:
            self._leave()

    def file_extents(self, lba: int, blocks: int) -> list[FileExtent]:
        """:class:`~lunsync.snapshots.device.FileExtents`: the origin's. A range with staged writes has no such
        extents yet (its data is not all in the origin's file): NotReady, so that no reader copies old data."""
        if self._staged and self._staged_top(lba, lba + blocks):
            raise NotReady(f"lun {self.name}: blocks {lba}+{blocks} have writes not yet on the origin's file")
        return self.origin.file_extents(lba, blocks)

    async def begin_copy(self, lba: int, blocks: int) -> int:
        """:class:`~lunsync.snapshots.device.CopyTarget`: preserve what the snapshots need of the range, then hand
        out the origin's descriptor."""
        await self.preserve_range(lba, blocks)
        return await self.origin.begin_copy(lba, blocks)

    async def preserve_range(self, lba: int, blocks: int) -> None:
        """Preserve the whole chunks a range touches before something writes the origin's descriptor directly
        (a copier writes in chunks or more, and may write past the range within its chunks). Staged writes to those
        chunks land first, so that none lands over what the copier writes."""
        cs, bs = self.chunk_size, self.origin.block_size
        start = lba * bs // cs * cs
        end = -(-(lba + blocks) * bs // cs) * cs
        while blocks and (top := self._staged_top(start // bs, end // bs)):
            await self._landed(top)
        while self._newest and blocks:
            need = self._needs(start, end)
            if not need:
                break
            await self._preserve(need)

    async def flush(self) -> None:
        """Land every write staged before this call on the origin, then flush the origin: every write acknowledged
        before it is durable when this returns, or this raises the error that kept a staged write from the origin."""
        if self._stage_seq > self._landed_seq:
            await self._landed(self._stage_seq)
        await self.origin.flush()
        err, self._stage_error = self._stage_error, None
        if err is not None:
            raise err

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        return self.origin.lba_status(lba, max_extents)

    async def resize(self, num_blocks: int) -> None:
        await self._landed(self._stage_seq)
        await self._enter()
        try:
            await self.origin.resize(num_blocks)
        finally:
            self.num_blocks = self.origin.num_blocks  # also after a failed resize: whatever length the origin has now
            self._leave()

    async def close(self) -> None:
        """Land the staged writes, wait for preservations in flight, close the pool file, then close the origin."""
        await self._landed(self._stage_seq)
        self._closed = True
        if self._runner is not None:
            await asyncio.wait([self._runner])
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        await self.origin.close()

    # --- preservation ---------------------------------------------------------------------------------------------

    async def _preserve(self, chunks: list[tuple[int, int]]) -> None:
        """Preserve these ``(chunk, units)`` for the newest epoch (or invalidate their snapshots). A chunk whose
        preservation is already running is only waited for: the caller checks again, and preserves what that one
        did not cover."""
        for fut in self._request(chunks):
            # Shielded: a cancelled writer must not cancel a preservation others wait for.
            await asyncio.shield(fut)

    def _request(self, chunks: list[tuple[int, int]]) -> list[asyncio.Future[None]]:
        """Queue these ``(chunk, units)`` for the next batch; the futures to wait for (see :meth:`_preserve`)."""
        waits: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for c, want in chunks:
            queued = self._pending.get(c)
            if queued is not None:  # not started yet: it takes these units too
                self._pending[c] = (queued[0] | want, queued[1])
                waits.append(queued[1])
                continue
            fut = self._inflight.get(c)
            if fut is None:
                fut = loop.create_future()
                self._inflight[c] = fut
                self._pending[c] = (want, fut)
            waits.append(fut)
        if self._pending and (self._runner is None or self._runner.done()):
            self._runner = loop.create_task(self._run_batches(), name=f"cow-{self.name}")
        return waits

    async def _run_batches(self) -> None:
        while self._pending:
            batch = [(c, want, fut) for c, (want, fut) in self._pending.items()]
            self._pending = {}
            started = time.perf_counter()
            try:
                await self._copy_batch(batch)
            except BaseException as exc:  # never leave a writer waiting on a future nobody completes
                for c, _, fut in batch:
                    self._inflight.pop(c, None)
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else StorageError(str(exc)))
                        fut.exception()
                if not isinstance(exc, Exception):
                    raise
            self.stats.copy_batches += 1
            self.stats.copy_seconds += time.perf_counter() - started

    async def _copy_batch(self, batch: list[tuple[int, int, asyncio.Future[None]]]) -> None:
        if self._landing:
            # A write still landing on the origin's threads passed its check before the newest snapshot, which
            # contains it: the copy must hold what it writes, so it is read only once the write has landed.
            await self._after_landing({c for c, _, _ in batch})
        pool = self._pool
        epoch = self._newest
        failed: dict[int, tuple[str, int]] = {}  # chunk -> (why, the units it needed)
        items: list[_Item] = []
        if pool is None:
            failed = {c: (self.pool_unavailable or "no pool", want) for c, want, _ in batch}
        else:
            # In chunk order, and the batch's units packed in it into one run of blocks: a run of chunks then lies
            # in a run of blocks, copied as one extent (see _copy_now), and scattered units are one append.
            packed: list[_Item] = []
            need = 0
            for c, want, _ in sorted(batch, key=_chunk_of):
                if epoch == 0:
                    continue  # the snapshots went away meanwhile
                covered = self._covered(c, epoch)
                missing = want & ~covered
                if not missing:
                    continue  # preserved by an earlier batch
                mine = next((slot for e, slot in self._copies.get(c, ()) if e == epoch), None)
                if mine is not None and mine >= 0:  # a copy of the older layout: its slot has room for the units
                    items.append(_Item(c, mine, missing, self._masks.get((c, epoch), FULL) | missing, False))
                    continue
                blocks = (missing & self._full).bit_count()
                try:
                    pool.reserve(need + blocks * self.unit)
                except OutOfSpace as exc:
                    failed[c] = (str(exc), want)
                    continue
                need += blocks * self.unit
                if mine is not None:  # this epoch's copy lacks some units: a piece more
                    it = _Item(c, PACKED, missing, self._masks.get((c, epoch), FULL) | missing, False)
                else:  # only a chunk no later copy serves may be recorded as a whole hole (ZERO): it would hide them
                    it = _Item(c, PACKED, missing, missing, True, hole_ok=not covered)
                items.append(it)
                packed.append(it)
            if packed:
                loc = self._alloc(need // self.unit)
                for it in packed:
                    it.loc = loc
                    loc += (it.copy & self._full).bit_count()
                self._account()
            if items:
                done, errors = await asyncio.to_thread(self._copy_and_commit, pool, items, epoch)
                for it in done:
                    if it.new:
                        bisect.insort(self._copies.setdefault(it.chunk, []), (epoch, it.slot))
                    if it.slot == PACKED:
                        self._places.setdefault((it.chunk, epoch), []).append((it.copy & self._full, it.loc))
                    if it.mask & self._full == self._full:
                        self._masks.pop((it.chunk, epoch), None)
                    else:
                        self._masks[(it.chunk, epoch)] = it.mask
                self.stats.copies += len(done)
                kept = {it.loc for it in done if it.slot == PACKED}
                for it in items:
                    if it.chunk in errors:
                        failed[it.chunk] = (errors[it.chunk], it.copy)
                    if it.slot == PACKED and it.loc not in kept:  # failed, or the chunk was a hole: no blocks
                        blocks = (it.copy & self._full).bit_count()
                        if it.chunk in errors:  # what a failed copy wrote is mapped by nothing: give the space back
                            try:
                                punch(self._data_fd, it.loc * self.unit, blocks * self.unit)
                            except OSError:
                                pass  # a failing pool keeps the blocks; they are reused all the same
                        self._give(it.loc, blocks)
                self._account()
        if failed:
            await self._invalidate(failed)
        for c, _, fut in batch:
            self._inflight.pop(c, None)
            if not fut.done():
                fut.set_result(None)

    def _copy_now(self, pool: Pool, items: list[_Item], epoch: int) -> tuple[list[_Item], dict[int, str]]:
        """In a thread: copy the wanted units of each chunk to its slot, then append the maps (each with the CRC of
        the bytes it copied) to the pool's map log, fdatasync'ing the pool file and the log at the same time: one
        flush round per batch. Only after both returned does the caller let the origin be written, so a crash finds
        either a record whose copy matches its CRC, or a record that does not match (or none) and an origin still
        unchanged in those units, which an open treats as not preserved (see :class:`_MapLog`). A new copy of a
        chunk that is a hole on the origin is recorded as ``ZERO`` (whole: every unit reads zeros): no copy, and
        when the whole batch is holes, no pool-file sync (only the map log's).

        The copies go through one buffer per extent: units that lie next to each other both on the origin and in
        the pool file (a sequential write's whole chunks, in slots taken in chunk order) are one ``preadv`` and one
        ``pwritev``, however many chunks they span, and the CRC is taken of the buffer written, so nothing is read
        back (the bytes an open will read are those bytes, or a torn write the CRC tells apart). A batch that copies
        more than ``_CRC_MAX_BYTES`` takes two flush rounds instead, the pool file's and then the log's, and its
        records carry no CRC: a record reaches the disk only after its copy has, so an open has nothing to check;
        its extents of a chunk or more are copied by the kernel (``copy_file_range``)."""
        cs, unit = self.chunk_size, self.unit
        src, dst = self.origin.fileno(), self._data_fd
        size = self.origin.num_blocks * self.origin.block_size
        done: list[_Item] = []
        proofs: list[tuple[int, int, int, int, int]] = []
        errors: dict[int, str] = {}
        # The copies to make: each item's (extent, offset in it, bytes) pieces; extents are [origin offset, slot
        # file offset, bytes, the items in it].
        todo: list[tuple[_Item, int, list[tuple[int, int, int]]]] = []
        extents: list[tuple[int, int, int, list[int]]] = []
        for it in items:
            c = it.chunk
            length = min(cs, size - c * cs)
            try:
                if it.new and it.hole_ok and (length <= 0 or is_hole(src, c * cs, length)):
                    done.append(_Item(c, ZERO, FULL, FULL, True))
                    proofs.append((0, 0, 0, 0, 0))
                    continue
            except OSError as exc:
                errors[c] = f"copying chunk {c}: {exc.strerror or exc}"
                continue
            pieces: list[tuple[int, int, int]] = []
            for off, n in _runs(it.copy, unit, length):
                o, d = c * cs + off, _place(it.slot if it.slot != PACKED else PACKED - it.loc, it.copy, cs, unit, off)
                if extents:
                    eo, ed, en, members = extents[-1]
                    if eo + en == o and ed + en == d and en + n <= _EXTENT_MAX:
                        pieces.append((len(extents) - 1, en, n))
                        extents[-1] = (eo, ed, en + n, members)
                        if members[-1] != len(todo):
                            members.append(len(todo))
                        continue
                pieces.append((len(extents), 0, n))
                extents.append((o, d, n, [len(todo)]))
            todo.append((it, length, pieces))
        # A large batch makes its copies durable first and then writes records that need no CRC (nothing to check
        # at open: a record is on disk only after its copy is): a CRC costs about 0.7 ms of CPU per MiB copied here
        # (zlib), more than the second flush round waits, and CPU is what a busy target lacks. Its extents of a
        # chunk or more then go through the kernel (copy_file_range: no copy through user space, and a reflink
        # where the file system can), the smaller ones through a buffer, which costs less for a unit or two.
        flushed = sum(n for _, _, n, _ in extents) > _CRC_MAX_BYTES
        buffers: list[memoryview | None] = []
        # Buffers whose places in the pool file follow one another (a batch's packed units) go out in one pwritev:
        # (extent indexes, where the first one goes).
        run: tuple[list[int], int] = ([], 0)
        runs: list[tuple[list[int], int]] = []
        for x, (o, d, n, members) in enumerate(extents):
            buf = None
            try:
                if flushed and n >= cs:
                    copy_range(src, dst, n, o, d)
                else:
                    buf = memoryview(bytearray(n))  # zeros: past the origin's end a copy reads as zeros, as there
                    pread_full(src, buf, o)
                    xs = run[0]
                    if xs and extents[xs[-1]][1] + extents[xs[-1]][2] == d and len(xs) < _IOV_MAX:
                        xs.append(x)
                    else:
                        run = ([x], d)
                        runs.append(run)
            except OSError as exc:
                for i in members:
                    errors[todo[i][0].chunk] = f"copying chunk {todo[i][0].chunk}: {exc.strerror or exc}"
            buffers.append(buf)
        for xs, at in runs:
            try:
                _pwritev_full(dst, [b for b in (buffers[i] for i in xs) if b is not None], at)
            except OSError as exc:
                for x in xs:
                    for i in extents[x][3]:
                        errors[todo[i][0].chunk] = f"copying chunk {todo[i][0].chunk}: {exc.strerror or exc}"
        copied = [(it, length, pieces) for it, length, pieces in todo if it.chunk not in errors]
        flushed = flushed and bool(copied)
        if flushed:
            try:
                os.fdatasync(dst)
            except OSError as exc:
                why = f"making copies durable: {exc.strerror or exc}"
                errors.update({it.chunk: why for it, _, _ in copied})
                copied = []
        for it, length, pieces in copied:
            if flushed:
                proofs.append((0, 0, 0, 0, 0))
            else:
                crc = 0
                for x, rel, n in pieces:
                    view = buffers[x]
                    assert view is not None
                    crc = zlib.crc32(view[rel:rel + n], crc)
                proofs.append((it.copy, cs, unit, length, crc))
            done.append(it)
        if done:
            try:
                pool.commit(self.lun_id, [_row(it, epoch, self._full) for it in done], proofs,
                            (lambda: os.fdatasync(dst)) if copied and not flushed else None)
            except (OSError, sqlite3.Error) as exc:
                why = f"making copies durable: {getattr(exc, 'strerror', None) or exc}"
                errors.update({it.chunk: why for it in done})
                done = []
        return done, errors

    async def _invalidate(self, failed: dict[int, tuple[str, int]]) -> None:
        """The snapshots that needed a failed preservation lose it: every live one that would read one of the units
        from the origin."""
        victims: set[int] = set()
        for c, (_, want) in failed.items():
            victims.update(e for e in self._epochs if self._covered(c, e) & want != want)
        self.stats.copy_failures += len(failed)
        if not victims:
            return
        reason = next(iter(failed.values()))[0]
        epochs = sorted(victims)
        log.error("lun %s: cannot preserve %d chunk(s) (%s): snapshot epoch(s) %s are now invalid", self.name,
                  len(failed), reason, epochs)
        if self.on_invalid is not None:
            await self.on_invalid(epochs, reason)  # durable before the origin is overwritten
        for e in epochs:
            self._drop(e)
        self.stats.invalidated += len(epochs)


# --- the snapshot view -------------------------------------------------------------------------------------------


class SnapshotView:
    """Snapshot ``epoch`` of a :class:`CowVolume` as a read-only BlockDevice.

    A read takes the range from the origin first and then overlays every chunk that has a copy for this snapshot.
    Checking the maps *after* the origin read is what makes it race-free without locks: an origin chunk only changes
    after its copy is committed, so a read that saw new data also sees the copy.

    A clone reads through its view while it fills. Once filled, the origin stops preserving for it and frees the
    copies only it needed, so whoever still holds the view (a restore started meanwhile) must read the clone's own
    file instead: ``redirect`` is set to it *before* the epoch is dropped, and a read that finds it set afterwards
    reads again from there, since the pool slots it read may have been freed and reused."""

    def __init__(self, volume: CowVolume, epoch: int, num_blocks: int) -> None:
        self.volume = volume
        self.epoch = epoch
        self._num_blocks = num_blocks
        self.valid = True  # cleared when the snapshot is invalidated or deleted
        self.redirect: BlockDevice | None = None  # the filled clone's file, once the epoch is about to go

    @property
    def block_size(self) -> int:
        return self.volume.block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def read_only(self) -> bool:
        return True

    @property
    def thin(self) -> bool:
        return False

    def _check(self, lba: int, blocks: int) -> None:
        if not self.valid:
            raise NotReady(f"snapshot epoch {self.epoch} of lun {self.volume.name} is invalid")
        if self.volume.pool_unavailable is not None and self.redirect is None:
            raise NotReady(f"snapshot epoch {self.epoch} of lun {self.volume.name}: {self.volume.pool_unavailable}")
        if lba < 0 or blocks < 0 or lba + blocks > self._num_blocks:
            raise OutOfRange(f"blocks {lba}+{blocks} outside 0..{self._num_blocks}")

    async def read(self, lba: int, blocks: int) -> bytearray:
        self._check(lba, blocks)
        if self.redirect is not None:
            return bytearray(await self.redirect.read(lba, blocks))
        vol = self.volume
        if not vol.settled(self.epoch):
            await vol.settle_snapshot(self.epoch)
        buf = await vol.origin.read(lba, blocks)
        if not isinstance(buf, bytearray):
            buf = bytearray(buf)
        bs, cs = vol.block_size, vol.chunk_size
        start, end = lba * bs, (lba + blocks) * bs
        segments = []
        for c in range(start // cs, (end - 1) // cs + 1) if blocks else ():
            for off, length, slot in vol.pieces(c, self.epoch):
                lo, hi = max(start, c * cs + off), min(end, c * cs + off + length)
                if slot is None or lo >= hi:
                    continue
                if slot == ZERO:
                    buf[lo - start:hi - start] = bytes(hi - lo)
                else:
                    segments.append((slot + lo - c * cs - off, lo - start, hi - lo))
        if segments:
            try:
                await asyncio.to_thread(_read_segments, vol._data_fd, buf, segments)
            except OSError as exc:
                raise storage_error(exc, f"read snapshot of {vol.name} from the pool", lba, write=False) from exc
        if not self.valid:  # invalidated while we read: never hand out data that may be wrong
            raise NotReady(f"snapshot epoch {self.epoch} of lun {vol.name} is invalid")
        if self.redirect is not None:  # filled while we read: what we read may be gone, the clone's file is not
            return bytearray(await self.redirect.read(lba, blocks))
        return buf

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        raise ReadOnly("a snapshot is read-only")

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        raise ReadOnly("a snapshot is read-only")

    async def flush(self) -> None:
        return None

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        if not 0 <= lba < self._num_blocks:
            raise OutOfRange(f"block {lba} outside 0..{self._num_blocks}")
        return [LbaExtent(lba, self._num_blocks - lba, True)]

    # --- capabilities (lunsync.snapshots.device) --------------------------------------------------------------

    def file_extents(self, lba: int, blocks: int) -> list[FileExtent]:
        """:class:`~lunsync.snapshots.device.FileExtents`: each piece of a chunk (see :meth:`CowVolume.pieces`) is
        in the pool file, a run of zeros (preserved as a hole), or still the origin's (split where a thin origin has holes). A filled clone's view
        answers from the clone's own file."""
        self._check(lba, blocks)
        if self.redirect is not None:
            if not isinstance(self.redirect, FileExtents):
                raise NotReady(f"snapshot epoch {self.epoch} of lun {self.volume.name}: its clone file has no extents")
            return self.redirect.file_extents(lba, blocks)
        vol = self.volume
        if not vol.settled(self.epoch):  # the snapshot service records a snapshot only once it has settled
            raise NotReady(f"snapshot epoch {self.epoch} of lun {vol.name}: writes it contains are still landing")
        bs, cs = vol.block_size, vol.chunk_size
        out: list[FileExtent] = []
        pos, end = lba * bs, (lba + blocks) * bs
        while pos < end:
            c = pos // cs
            for p_off, p_len, slot in vol.pieces(c, self.epoch):
                lo, hi = max(pos, c * cs + p_off), min(end, c * cs + p_off + p_len)
                if lo >= hi:
                    continue
                runs: list[FileExtent]
                if slot is None:
                    runs = vol.origin.file_extents(lo // bs, (hi - lo) // bs)
                elif slot == ZERO:
                    runs = [(-1, lo, hi - lo)]
                elif vol._data_fd < 0:
                    raise NotReady(f"snapshot epoch {self.epoch} of lun {vol.name}: the pool file is closed")
                else:
                    runs = [(vol._data_fd, slot + lo - c * cs - p_off, hi - lo)]
                for fd, off, length in runs:
                    if out and out[-1][0] == fd and (fd < 0 or out[-1][1] + out[-1][2] == off):
                        out[-1] = (fd, out[-1][1], out[-1][2] + length)
                    else:
                        out.append((fd, off, length))
            pos = min(end, (c + 1) * cs)
        return out

    def changed_regions(self, region_bytes: int) -> set[int] | None:
        """:class:`~lunsync.snapshots.device.ChangedRegions`: the regions overlapping a chunk that has a copy for
        this snapshot, i.e. one the origin has written since. None once the snapshot no longer follows its origin
        (a filled clone) or is invalid."""
        if not self.valid or self.redirect is not None or region_bytes <= 0:
            return None
        cs = self.volume.chunk_size
        out: set[int] = set()
        for c in self.volume.changed_chunks(self.epoch):
            out.update(range(c * cs // region_bytes, ((c + 1) * cs - 1) // region_bytes + 1))
        return out

    async def resize(self, num_blocks: int) -> None:
        raise ReadOnly("a snapshot cannot be resized")

    async def close(self) -> None:
        return None  # the volume owns every descriptor


async def _nothing() -> None:
    """What :meth:`CowVolume.write` hands back for a write that has already landed."""


async def _failed(exc: BaseException) -> None:
    raise exc


def _read_segments(fd: int, buf: bytearray, segments: list[tuple[int, int, int]]) -> None:
    view = memoryview(buf)
    for src, dst, length in segments:
        part = view[dst:dst + length]
        while part:
            got = os.preadv(fd, [part], src)
            if got == 0:  # a slot past EOF was never written: zeros (the origin chunk was a hole)
                part[:] = bytes(len(part))
                break
            part = part[got:]
            src += got


def _chunk_of(entry: tuple[int, int, asyncio.Future[None]]) -> int:
    return entry[0]


def _runs(units: int, unit: int, length: int) -> list[tuple[int, int]]:
    """The ``(offset, bytes)`` runs within a chunk of ``length`` bytes that the bits of ``units`` cover, in order
    (the last unit cut at ``length``)."""
    out: list[tuple[int, int]] = []
    u = 0
    while units >> u and u * unit < length:
        if not units >> u & 1:
            u += 1
            continue
        run = u
        while units >> run & 1 and run * unit < length:
            run += 1
        out.append((u * unit, min(run * unit, length) - u * unit))
        u = run
    return out


def _place(slot: int, units: int, cs: int, unit: int, off: int) -> int:
    """Where the byte at ``off`` in a chunk lies in the pool file, for a record with this slot (of the older layout,
    or ``PACKED - block``) that copied ``units``: a packed piece holds them one after another from its block on."""
    if slot >= 0:
        return slot * cs + off
    u = off // unit
    return (PACKED - slot + (units & ((1 << u) - 1)).bit_count()) * unit + off - u * unit


def _row(it: _Item, epoch: int, full: int) -> tuple[int, int, int, int]:
    """The map record of a batch item: a packed piece says where its units are and which (this batch's); a copy of
    the older layout (or of a hole) says its slot and every unit it holds so far."""
    if it.slot == PACKED:
        return it.chunk, epoch, PACKED - it.loc, FULL if it.copy & full == full else it.copy
    return it.chunk, epoch, it.slot, FULL if it.mask & full == full else it.mask


def _pwritev_full(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Write all of ``bufs`` one after another from ``offset`` with as few pwritev calls as the kernel allows (a
    short write goes on where it stopped; one that makes no progress is an error)."""
    i = 0
    while i < len(bufs):
        done = os.pwritev(fd, bufs[i:i + _IOV_MAX], offset)
        if done <= 0:
            raise OSError(errno.EIO, "write made no progress")
        offset += done
        while i < len(bufs) and done >= len(bufs[i]):
            done -= len(bufs[i])
            i += 1
        if done:
            bufs[i] = bufs[i][done:]

"""The block-device protocol: the one interface between the SCSI layer and the storage engine, and the optional
capabilities a device may declare on top of it.

A plain volume, a volume with snapshots and a volume under resync all implement :class:`BlockDevice`, and the SCSI
layer cannot tell them apart. Addresses and lengths are in logical blocks of ``block_size`` bytes. Each method says
what is durable when it returns and whether it may yield to the event loop (suspend at an ``await``): a method that
"does not yield before X" lets a caller rely on X having happened, in order, with no other task run in between.
Methods raise only the family in :mod:`lunsync.snapshots.errors`.

Capabilities (:class:`FileExtents`, :class:`CopyTarget`, :class:`ChangedRegions`, :class:`StoreSnapshots`,
:class:`ZeroWriter`, :class:`MappingQuery`, :class:`InlineWrite`) are separate protocols that a device implements when it can: the resync
copier, the clone fill and the SCSI layer ask for one with ``isinstance`` and fall back to
``read``/``write``/``lba_status`` when it is absent, and the snapshot engine takes a store's own snapshots when it
declares :class:`StoreSnapshots`. Nothing above a backend touches its file descriptors except through
:class:`FileExtents` and :class:`CopyTarget`, which hand them out for the length of one copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview

# One run of a device's bytes in a file: (descriptor, byte offset, byte length); descriptor -1 means the run reads as
# zeros and lies nowhere. The descriptor stays owned by the device that handed it out.
FileExtent = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class LbaExtent:
    """One run of GET LBA STATUS: ``blocks`` blocks from ``lba`` are mapped (``mapped``) or deallocated."""

    lba: int
    blocks: int
    mapped: bool


@runtime_checkable
class BlockDevice(Protocol):
    """What a LUN is to the SCSI layer."""

    @property
    def block_size(self) -> int:
        """Logical block size in bytes (512 or 4096)."""
        ...

    @property
    def num_blocks(self) -> int:
        """Capacity in logical blocks."""
        ...

    @property
    def read_only(self) -> bool:
        """True when every write must be refused (DATA PROTECT)."""
        ...

    @property
    def thin(self) -> bool:
        """True when the device supports UNMAP and reports LBPME (sparse file, snapshot-backed volume)."""
        ...

    async def read(self, lba: int, blocks: int) -> Buffer:
        """Return ``blocks * block_size`` bytes from ``lba``, a buffer the caller owns. Holes read as zeros.

        May yield (a page-cache miss, a network store). Sees every write that returned before it was called.
        """
        ...

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        """Write ``data`` (a whole number of blocks) at ``lba``.

        Durable on return only with ``fua``; without it the data is written back (a later :meth:`flush` makes it
        durable) but visible to every read that starts after this returns. May yield: a copy-on-write volume first
        preserves what its snapshots need, and ``fua`` waits for the store. A device whose writes land without
        waiting (the file and block backends' ``pwritev`` into the page cache) does not yield before the data is in
        place, so two writes issued in order land in that order.
        """
        ...

    async def flush(self) -> None:
        """Make every write that completed before this call durable (fdatasync, a cluster flush). SYNCHRONIZE CACHE
        lands here. Yields. A failed flush is reported by every later flush too: the lost writes stay lost."""
        ...

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Deallocate each (lba, blocks) range; they read as zeros afterwards (LBPRZ). Not durable until
        :meth:`flush`. Every range is checked before any is touched. Yields."""
        ...

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        """Describe the mapping from ``lba`` onwards (SEEK_DATA/SEEK_HOLE on a sparse file). Synchronous: no I/O
        wait, never yields; a store that can only answer over the network reports everything mapped."""
        ...

    async def resize(self, num_blocks: int) -> None:
        """Grow (or shrink) the device to ``num_blocks``. Durable on return. Yields."""
        ...

    async def close(self) -> None:
        """Flush and release the backing store; idempotent. Yields until in-flight work on the store has ended."""
        ...


@runtime_checkable
class InlineWrite(Protocol):
    """Capability: a write that needs nothing but the store's page cache can be done on the spot, with no coroutine,
    so the SCSI layer's WRITE goes from its handler to ``pwritev`` and back with no frame in between.

    Declared by the file and block backends and by copy-on-write volumes (which pass it on to their origin while no
    snapshot needs a copy, no hold is up and nothing is staged)."""

    def write_inline(self, lba: int, data: Buffer) -> bool:
        """Write ``data`` at ``lba`` now, as :meth:`BlockDevice.write` without ``fua`` would, and return True; or
        return False, with nothing written, when this write needs more than that (a preservation, a hold, a store
        whose writes go to its threads): the caller then awaits :meth:`BlockDevice.write`. Never yields; raises
        what :meth:`BlockDevice.write` raises."""
        ...


@runtime_checkable
class FileExtents(Protocol):
    """Capability: the device can say where its bytes lie in files, so a copier can hand them to
    ``os.copy_file_range`` (a reflink on XFS/btrfs) instead of reading them through Python.

    Declared by the file and block backends, copy-on-write volumes and snapshot views."""

    def file_extents(self, lba: int, blocks: int) -> list[FileExtent]:
        """The runs covering ``blocks`` blocks from ``lba``, in order, summing to exactly that many bytes; a run with
        descriptor -1 reads as zeros. Synchronous (SEEK_DATA at most), never yields. The descriptors stay the
        device's and are valid until it closes; what they hold may change as the device is written, so a copier that
        raced writes resolves the extents again afterwards and copies again what moved."""
        ...


@runtime_checkable
class CopyTarget(Protocol):
    """Capability: the device accepts offloaded copies written straight into its file.

    Declared by the file and block backends, and by copy-on-write volumes (which preserve first)."""

    async def begin_copy(self, lba: int, blocks: int) -> int:
        """Prepare ``blocks`` blocks from ``lba`` to be overwritten by an offloaded copy and return the descriptor to
        write them into (byte offset = ``lba * block_size``). A copy-on-write volume preserves what its snapshots need
        of the range before returning. The caller keeps other writers off the range until its copy ends, and the
        copy is durable only after :meth:`BlockDevice.flush`. Yields."""
        ...


@runtime_checkable
class ChangedRegions(Protocol):
    """Capability of a snapshot: which regions its origin has changed since it was taken, so that a restore onto
    that origin copies only those ("only what changed").

    Declared by copy-on-write snapshot views (their chunk maps) and RBD snapshot views (``diff_iterate``)."""

    def changed_regions(self, region_bytes: int) -> set[int] | None:
        """The regions (of ``region_bytes`` from the start) where the origin's current contents may differ from the
        snapshot's; None when this snapshot cannot tell at that granularity (then everything must be copied).
        Synchronous, never yields; an RBD view asks the cluster and blocks, so callers run that one in a thread."""
        ...


@runtime_checkable
class AllocatedRegions(Protocol):
    """Capability of a snapshot: which regions hold data at all, so that a restore into a new, empty LUN copies only
    those (the others read as zeros on both sides).

    Declared by RBD snapshot views (``diff_iterate`` against nothing)."""

    async def allocated_regions(self, region_bytes: int) -> set[int] | None:
        """The regions (of ``region_bytes`` from the start) that may hold data; outside them the device reads zeros.
        None when it cannot tell. Yields (the store is asked)."""
        ...


@runtime_checkable
class StoreSnapshots(Protocol):
    """Capability of a store that keeps snapshots itself (an RBD image): taking one is instant and lunsync does no
    copy-on-write for it, so such a LUN's snapshots are the store's. The snapshot engine still holds the LUN's writes
    around :meth:`create_snapshot`, so that a set across several stores is one point in time.

    Declared by the RBD backend. Every method blocks on the store: callers run them in a thread."""

    def create_snapshot(self, name: str) -> None:
        """Take snapshot ``name`` of what every write that completed before this call wrote; durable on return."""
        ...

    def remove_snapshot(self, name: str) -> bool:
        """Remove snapshot ``name`` (False: there was none). Refused while a clone depends on it."""
        ...

    def list_snapshots(self) -> list[str]:
        """The names of the snapshots of this store that lunsync took (not other snapshots the store has)."""
        ...

    def snapshot_space_bytes(self, name: str) -> int:
        """The bytes the store keeps for snapshot ``name`` alone: its data that the store's next newer snapshot (or
        its head) no longer shares, at the store's granularity."""
        ...

    def open_snapshot(self, name: str) -> BlockDevice:
        """A read-only device of snapshot ``name``, declaring :class:`ChangedRegions` against this store's head. The
        caller closes it."""
        ...

    def clone_snapshot(self, name: str, image: str) -> str:
        """Make a new store ``image`` beside this one that reads as snapshot ``name`` and shares its data (an RBD
        clone), and return the path a LUN names it by. The snapshot cannot be removed while the clone depends on it."""
        ...

    def flatten(self, progress: Callable[[int, int], bool] | None = None) -> bool:
        """Copy into this store (a clone) what it still reads from its parent snapshot, so it no longer depends on
        it; durable on return. ``progress(done, total)`` is called (on the store's thread) as the copy goes on, in
        units of the store's choosing; when it returns False the copy stops early, what was copied stays, and this
        returns False (a later flatten goes on from there). True once the store depends on no snapshot; a store that
        is no clone is done at once."""
        ...


@runtime_checkable
class ZeroWriter(Protocol):
    """Capability: the device can make a range read as zeros without being sent the zeros (librbd's write-zeroes),
    so WRITE SAME of a zero block costs one request instead of a stream of zero-filled writes.

    Declared by the RBD backend."""

    async def write_zeroes(self, lba: int, blocks: int, fua: bool = False) -> None:
        """Make ``blocks`` blocks from ``lba`` read as zeros, the range checked first. Durable on return only with
        ``fua``, like :meth:`BlockDevice.write`, and visible to every read that starts after it returns. Yields."""
        ...


@runtime_checkable
class MappingQuery(Protocol):
    """Capability: the device can describe its mapping, but only by asking its store over the network, so the answer
    is awaited rather than computed inline (RBD's ``diff_iterate``). GET LBA STATUS uses it in place of the
    synchronous :meth:`BlockDevice.lba_status`, which such a device answers with everything mapped.

    Declared by the RBD backend."""

    async def query_lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        """What :meth:`BlockDevice.lba_status` describes, from the store's allocation map: a run reported
        deallocated reads as zeros; mapped may be reported for blocks that hold zeros. Yields."""
        ...

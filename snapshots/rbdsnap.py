"""RBD's own snapshots and clones, as lunsync's snapshot engine uses them for LUNs kept in RBD images.

This module owns what lunsync does with an image's snapshots through librbd: taking one (instant: Ceph keeps the
point in time, lunsync copies nothing on write), removing one (unprotecting it first; one that still has clones is
refused), cloning one into a new image (protecting the parent snapshot, which the v1 clone format needs and v2
tolerates; librbd's ``rbd_default_clone_format = auto`` picks v2 whenever the cluster's minimum client allows it),
flattening a clone, and finding what changed since a snapshot (``diff_iterate`` from the snapshot to the image head)
as extents and as the resync's regions. :class:`ChangedSince` gives a read-only snapshot device the
:class:`~lunsync.snapshots.device.ChangedRegions` capability from those extents. Every function here blocks on the
cluster: callers run them in a thread, never on the event loop. librbd's errors become the storage error family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lunsync.snapshots.device import AllocatedRegions, BlockDevice, Buffer, LbaExtent
from lunsync.snapshots.errors import SnapshotInUse, StorageError

try:  # Debian's python3-rbd; a host without it has no RBD LUNs, so nothing here is reached there
    import rbd
except ImportError:  # pragma: no cover
    rbd = None

__all__ = [
    "ChangedSince",
    "RbdSnapshotError",
    "changed_extents",
    "clone_snapshot",
    "create_snapshot",
    "flatten",
    "held_bytes",
    "lunsync_snapshots",
    "regions_of",
    "remove_snapshot",
    "snapshot_name",
]

# The RBD snapshot that holds lunsync snapshot LUN@NAME is called ``lunsync.NAME``: a prefix an operator's own
# snapshots do not use, so lunsync never removes or overwrites one of theirs, and a leftover of a snapshot whose
# record never committed (a crash mid-create) is recognisably lunsync's to replace.
PREFIX = "lunsync."


class RbdSnapshotError(StorageError):
    """librbd refused a snapshot operation; the message says which and why."""


def snapshot_name(name: str) -> str:
    """The RBD snapshot name of lunsync snapshot ``name`` (already validated: 1-64 of A-Z a-z 0-9 . _ -)."""
    return PREFIX + name


def _fail(what: str, exc: Exception) -> RbdSnapshotError:
    return RbdSnapshotError(f"{what}: {exc}")


def create_snapshot(image: rbd.Image, name: str) -> None:
    """Take RBD snapshot ``name`` of the open ``image``; durable in the cluster on return. A lunsync-prefixed snapshot
    of that name left by a create whose catalog record never committed is replaced: nothing refers to it. Blocking.

    librbd's own quiesce round (a watch-notify through the OSD asking quiesce-aware clients such as rbd-nbd to pause)
    is skipped: the caller has already quiesced the image's writers with its write gate, and the round would add an
    OSD round trip to the time every write of a set is held."""
    try:
        if name.startswith(PREFIX) and image.snap_exists(name):
            _remove(image, name)
        image.create_snap(name, rbd.RBD_SNAP_CREATE_SKIP_QUIESCE)
    except rbd.Error as exc:
        raise _fail(f"create RBD snapshot {name}", exc) from exc


def lunsync_snapshots(image: rbd.Image) -> list[str]:
    """The lunsync snapshot names (without the prefix) among the image's RBD snapshots. Blocking."""
    try:
        return sorted(s["name"][len(PREFIX):] for s in image.list_snaps() if s["name"].startswith(PREFIX))
    except rbd.Error as exc:
        raise _fail("list RBD snapshots", exc) from exc


def _remove(image: rbd.Image, name: str) -> None:
    if image.is_protected_snap(name):
        try:
            image.unprotect_snap(name)
        except rbd.ImageBusy as exc:  # librbd refuses while clones depend on it
            raise SnapshotInUse(f"RBD snapshot {name} has clones; flatten or remove them first") from exc
    image.remove_snap(name)


def remove_snapshot(image: rbd.Image, name: str) -> bool:
    """Remove RBD snapshot ``name`` of the open ``image``, unprotecting it first; False when it does not exist (a
    delete that a crash interrupted after the removal). Refused with :class:`SnapshotInUse` while a clone still
    depends on it. Blocking."""
    try:
        if not image.snap_exists(name):
            return False
        _remove(image, name)
        return True
    except rbd.Error as exc:
        raise _fail(f"remove RBD snapshot {name}", exc) from exc


def clone_snapshot(ioctx: Any, image_name: str, name: str, dest_ioctx: Any, dest_name: str) -> None:
    """Make image ``dest_name`` an RBD clone of ``image_name@name`` (protecting the snapshot first). The clone shares
    the parent's data until :func:`flatten`. Blocking."""
    try:
        with rbd.Image(ioctx, image_name) as image:
            if not image.is_protected_snap(name):
                image.protect_snap(name)
        rbd.RBD().clone(ioctx, image_name, name, dest_ioctx, dest_name)
    except rbd.Error as exc:
        raise _fail(f"clone RBD snapshot {image_name}@{name} to {dest_name}", exc) from exc


def flatten(ioctx: Any, image_name: str) -> None:
    """Copy into clone ``image_name`` everything it still reads from its parent, so that it no longer depends on the
    parent snapshot (which may then be removed). Blocking, for as long as the copy takes."""
    try:
        with rbd.Image(ioctx, image_name) as image:
            image.flatten()
    except rbd.Error as exc:
        raise _fail(f"flatten RBD image {image_name}", exc) from exc


def changed_extents(ioctx: Any, image_name: str, name: str) -> list[tuple[int, int]]:
    """The (byte offset, length) extents where the head of ``image_name`` may differ from its snapshot ``name``, in
    order: librbd's ``diff_iterate`` from the snapshot to the head, at the granularity librbd tracks writes (never
    more than an object). Blocking; costs a walk of the image's objects (or of its object map with fast-diff)."""
    out: list[tuple[int, int]] = []

    def seen(offset: int, length: int, exists: bool) -> int:
        out.append((offset, length))
        return 0

    try:
        with rbd.Image(ioctx, image_name, read_only=True) as image:
            image.diff_iterate(0, image.size(), name, seen, include_parent=True, whole_object=False)
    except rbd.Error as exc:
        raise _fail(f"diff {image_name} against its snapshot {name}", exc) from exc
    return sorted(out)


def held_bytes(ioctx: Any, image_name: str, name: str) -> int:
    """The bytes the cluster keeps for snapshot ``name`` of ``image_name`` alone: the objects that existed at the
    snapshot and were written after it, up to the next newer snapshot of the image (any snapshot, lunsync's or not)
    or else the head; the OSDs keep a copy of each such object for the snapshot. At RADOS object granularity, and
    an object's full extent even where the snapshot's copy is sparse. Blocking; with fast-diff it reads object maps
    only."""
    found: list[tuple[int, int]] = []

    def seen(offset: int, length: int, exists: bool) -> int:
        found.append((offset, length))
        return 0

    try:
        with rbd.Image(ioctx, image_name, read_only=True) as head:
            snaps = sorted(head.list_snaps(), key=lambda s: int(s["id"]))
            ids = [s["name"] for s in snaps]
            if name not in ids:
                raise RbdSnapshotError(f"RBD snapshot {image_name}@{name} does not exist")
            later = ids[ids.index(name) + 1:]
            size = int(head.size())
        with rbd.Image(ioctx, image_name, snapshot=name, read_only=True) as at:
            at.diff_iterate(0, size, None, seen, include_parent=False, whole_object=True)
            had, found[:] = _merged(found), []
        with rbd.Image(ioctx, image_name, snapshot=later[0] if later else None, read_only=True) as newer:
            newer.diff_iterate(0, size, name, seen, include_parent=False, whole_object=True)
            changed = _merged(found)
    except rbd.Error as exc:
        raise _fail(f"measure RBD snapshot {image_name}@{name}", exc) from exc
    return _overlap(had, changed)


def _merged(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if out and out[-1][0] + out[-1][1] >= offset:
            start, n = out[-1]
            out[-1] = (start, max(start + n, offset + length) - start)
        elif length > 0:
            out.append((offset, length))
    return out


def _overlap(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> int:
    """Bytes in both of two sorted, merged extent lists."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        total += max(0, hi - lo)
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return total


def regions_of(extents: Iterable[tuple[int, int]], region_bytes: int) -> set[int]:
    """The regions of ``region_bytes`` (from offset 0) that the byte extents touch."""
    out: set[int] = set()
    for offset, length in extents:
        if length > 0:
            out.update(range(offset // region_bytes, (offset + length - 1) // region_bytes + 1))
    return out


class ChangedSince:
    """A read-only device of an RBD snapshot with the :class:`~lunsync.snapshots.device.ChangedRegions` and
    :class:`~lunsync.snapshots.device.AllocatedRegions` capabilities:
    the regions the image's head changed since, from :func:`changed_extents`. Every BlockDevice call goes to the
    snapshot device it wraps, which stays owned by whoever opened it (closing this closes it)."""

    def __init__(self, device: BlockDevice, changes: Callable[[], Sequence[tuple[int, int]]]) -> None:
        self.device = device
        self._changes = changes

    def changed_regions(self, region_bytes: int) -> set[int] | None:
        """Regions where the head may differ from the snapshot. Synchronous: one ``diff_iterate`` on the cluster."""
        return regions_of(self._changes(), region_bytes)

    async def allocated_regions(self, region_bytes: int) -> set[int] | None:
        """:class:`~lunsync.snapshots.device.AllocatedRegions` of the snapshot device, when it declares it."""
        if isinstance(self.device, AllocatedRegions):
            return await self.device.allocated_regions(region_bytes)
        return None

    @property
    def block_size(self) -> int:
        return self.device.block_size

    @property
    def num_blocks(self) -> int:
        return self.device.num_blocks

    @property
    def read_only(self) -> bool:
        return True

    @property
    def thin(self) -> bool:
        return self.device.thin

    async def read(self, lba: int, blocks: int) -> Buffer:
        return await self.device.read(lba, blocks)

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        await self.device.write(lba, data, fua)  # the snapshot device refuses it (ReadOnly)

    async def flush(self) -> None:
        await self.device.flush()

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        await self.device.unmap(ranges)

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        return self.device.lba_status(lba, max_extents)

    async def resize(self, num_blocks: int) -> None:
        await self.device.resize(num_blocks)

    async def close(self) -> None:
        await self.device.close()

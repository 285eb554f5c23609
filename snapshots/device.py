"""The block-device protocol: the one interface between the SCSI layer and the storage engine.

A plain volume, a volume with snapshots and a volume under resync all implement it, and the SCSI layer cannot tell
them apart. Addresses and lengths are in logical blocks of ``block_size`` bytes. Each method says what is durable when
it returns. Methods raise only the family in :mod:`lunsync.snapshots.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview


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
        """Return ``blocks * block_size`` bytes from ``lba``. Holes read as zeros."""
        ...

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        """Write ``data`` (a whole number of blocks) at ``lba``.

        Without ``fua`` the data is in the page cache (write-back) when this returns; with ``fua`` it is on stable
        storage (fdatasync) before this returns.
        """
        ...

    async def flush(self) -> None:
        """Make every completed write durable (fdatasync). SYNCHRONIZE CACHE lands here."""
        ...

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Deallocate each (lba, blocks) range. Deallocated blocks read as zeros (LBPRZ). Not durable until flush."""
        ...

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        """Describe the mapping from ``lba`` onwards (SEEK_DATA/SEEK_HOLE on a sparse file). Pure reads, no I/O wait."""
        ...

    async def resize(self, num_blocks: int) -> None:
        """Grow (or shrink) the device to ``num_blocks``. Durable on return."""
        ...

    async def close(self) -> None:
        """Flush and release the backing store."""
        ...

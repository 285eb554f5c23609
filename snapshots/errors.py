"""The storage error family.

The storage layer is the only place that turns an ``OSError`` into one of these. The SCSI dispatcher is the only
place that turns one of these into sense data. Nothing here knows about SCSI or iSCSI.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error the block-device protocol may raise."""


class MediumError(StorageError):
    """The backing store failed to read or write (EIO and friends). ``lba`` is the first block affected."""

    def __init__(self, message: str, lba: int | None = None, *, write: bool = False) -> None:
        super().__init__(message)
        self.lba = lba
        self.write = write


class OutOfSpace(StorageError):
    """The backing store (or the snapshot pool) has no room left (ENOSPC, EDQUOT)."""


class ReadOnly(StorageError):
    """A write reached a device that is read-only (an exposed snapshot, a read-only LUN)."""


class OutOfRange(StorageError):
    """An LBA range lies outside the device."""


class NotReady(StorageError):
    """The device is being torn down, or its backing file is gone."""


class Unreachable(NotReady):
    """The device is served by another process that is out of reach for now (a worker restarting): the same answer
    to an initiator (NOT READY, which it retries), but a copier that reads it waits and tries again instead of
    failing."""


class Saturated(StorageError):
    """The device's own I/O queue is full (its storage is slow or stuck): the command is refused now, and the SCSI
    layer answers TASK SET FULL, instead of queueing without bound behind what does not complete."""


class SnapshotInUse(StorageError):
    """A store's own snapshot (an RBD snapshot) cannot be removed while clones depend on it."""

"""A snapshot that another worker of ``serve --workers`` serves, as a read-only block device here, and the reads
that worker answers for it.

A LUN and its snapshots are open in one process only (the worker serving the LUN: per-LU state has one owner), and a
snapshot's unpreserved regions are its live origin's, so only that worker reads them coherently with its own
preservations. A restore onto a LUN of another worker, and a snapshot exposed on another worker's target, therefore
read the snapshot through :class:`RemoteSnapshot`: a :class:`~lunsync.snapshots.device.BlockDevice` that is
read-only and sends each read to the snapshot's worker, which reads its own view (:func:`serve_read`). The reads
travel over the control's channels (``snapshot-read``: the worker asks the control, the control asks the snapshot's
worker and relays the answer), not over a channel of their own between the two workers: the control already knows
which worker serves which LUN and whether it is up, follows a LUN that moves and a worker that restarts with no
second connection to set up, hand out or reconnect, and a restore is a bounded background copy, for which the relay
costs throughput (measured in the README) but not correctness. The data travel as raw bytes after their reply's frame
(:mod:`lunsync.provider.rpc`), in pieces of at most :data:`PIECE_BYTES`. A read while the snapshot's
worker is down (or restarting) raises :class:`~lunsync.snapshots.errors.Unreachable`: an initiator gets NOT READY,
which it retries, never data from anywhere else, and the resync copier waits and tries again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from lunsync.provider.channel import ChannelClosed, RemoteError
from lunsync.provider.rpc import Json
from lunsync.snapshots.device import Buffer, LbaExtent
from lunsync.snapshots.errors import MediumError, OutOfRange, ReadOnly, Unreachable

if TYPE_CHECKING:
    from lunsync.provider.daemon import Array
    from lunsync.provider.snapshot_service import SnapshotService
    from lunsync.snapshots.snapcat import SnapshotRecord

METHOD = "snapshot-read"
# Well inside the channel's 8 MiB frame; several pieces are in flight at once.
PIECE_BYTES = 4 << 20
IN_FLIGHT = 4

Call = Callable[[str, dict[str, Json]], Awaitable[Json]]


class RemoteSnapshot:
    """Snapshot ``ref`` (``LUN@SNAP``) of ``size`` blocks, read through ``call`` (the worker's call to the control)."""

    def __init__(self, ref: str, block_size: int, num_blocks: int, call: Call) -> None:
        self.ref = ref
        self._bs = block_size
        self._blocks = num_blocks
        self._call = call
        self.reads = 0

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_blocks(self) -> int:
        return self._blocks

    @property
    def read_only(self) -> bool:
        return True

    @property
    def thin(self) -> bool:
        return False

    async def _piece(self, lba: int, blocks: int) -> bytes:
        try:
            out = await self._call(METHOD, {"snapshot": self.ref, "lba": lba, "blocks": blocks})
        except ChannelClosed as e:
            raise Unreachable(f"snapshot {self.ref}: the control is out of reach ({e})") from None
        except RemoteError as e:
            if e.status == 503:
                raise Unreachable(f"snapshot {self.ref}: {e}") from None
            raise MediumError(f"snapshot {self.ref}: reading {blocks} blocks at {lba} failed: {e}", lba) from None
        data = out if isinstance(out, bytes) else b""
        if len(data) != blocks * self._bs:
            raise MediumError(f"snapshot {self.ref}: {len(data)} bytes came back for {blocks} blocks at {lba}", lba)
        return data

    async def read(self, lba: int, blocks: int) -> Buffer:
        if lba < 0 or blocks < 0 or lba + blocks > self._blocks:
            raise OutOfRange(f"blocks {lba}+{blocks} outside snapshot {self.ref} ({self._blocks} blocks)")
        self.reads += 1
        step = max(1, PIECE_BYTES // self._bs)
        if blocks <= step:
            return await self._piece(lba, blocks) if blocks else b""
        out = bytearray(blocks * self._bs)
        starts = list(range(lba, lba + blocks, step))
        for i in range(0, len(starts), IN_FLIGHT):
            group = starts[i:i + IN_FLIGHT]
            pieces = await asyncio.gather(*(self._piece(s, min(step, lba + blocks - s)) for s in group))
            for s, data in zip(group, pieces, strict=True):
                off = (s - lba) * self._bs
                out[off:off + len(data)] = data
        return out

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        raise ReadOnly(f"snapshot {self.ref} is read-only")

    async def flush(self) -> None:
        return None

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        raise ReadOnly(f"snapshot {self.ref} is read-only")

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        # Synchronous, so it cannot ask the other worker: everything is reported mapped, as a network store does.
        return [LbaExtent(lba, self._blocks - lba, True)] if lba < self._blocks else []

    async def resize(self, num_blocks: int) -> None:
        raise ReadOnly(f"snapshot {self.ref} is read-only")

    async def close(self) -> None:
        return None


def remote_view(array: Array, rec: SnapshotRecord) -> RemoteSnapshot | None:
    """The device through which this worker reads snapshot ``rec`` when another worker serves its LUN (a restore's
    source, an exposure on a target of this worker), None when it is this process's own to open."""
    call = array.remote_call
    if call is None or array.serves_lun(rec.lun_name):
        return None
    return RemoteSnapshot(rec.full_name, rec.block_size, rec.size_bytes // rec.block_size, call)


async def serve_read(snaps: SnapshotService, params: dict[str, Json]) -> bytes:
    """The snapshot's worker's side of ``snapshot-read``: read its own view of the snapshot (coherent with the
    preservations its origin makes), answer the blocks (raw bytes after the reply's frame)."""
    from lunsync.snapshots.catalog import Invalid
    from lunsync.snapshots.snapcat import parse_snapshot_name

    ref, lba, blocks = params.get("snapshot"), params.get("lba"), params.get("blocks")
    if not isinstance(ref, str) or not isinstance(lba, int) or not isinstance(blocks, int):
        raise Invalid(f"{METHOD}: bad params {sorted(params)}")
    lun, name = parse_snapshot_name(ref)
    rec = snaps.cat.get_snapshot(lun, name)
    if not snaps.array.serves_lun(lun) or (rec.needs_cow and lun not in snaps.array.luns):
        # Moving between workers, or not reopened yet: the control routes the next try to wherever it is.
        raise Unreachable(f"lun {lun!r} is not open on this worker now")
    if blocks * rec.block_size > PIECE_BYTES:
        raise Invalid(f"{METHOD}: {blocks} blocks is more than one piece ({PIECE_BYTES} bytes)")
    view = await snaps.open_view_async(rec)
    return bytes(await view.read(lba, blocks))

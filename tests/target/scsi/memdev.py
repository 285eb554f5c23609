"""An in-memory BlockDevice for the SCSI unit tests, plus helpers to build tasks and run a target.

MemDevice keeps a bytearray and a per-block mapped flag so UNMAP, WRITE SAME with UNMAP and GET LBA STATUS have
something real to observe; it raises the storage error family on demand (``fail_next``) so the sense mapping can be
tested without a disk. InlineMemDevice adds the inline-write capability the file-backed volumes declare.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from lunsync.snapshots.device import Buffer, LbaExtent
from lunsync.snapshots.errors import OutOfRange, ReadOnly, StorageError
from lunsync.snapshots.model import LunIdentity
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.target import ScsiTarget
from lunsync.target.scsi.task import Nexus, ScsiResponse, ScsiTask

T = TypeVar("T")


class MemDevice:
    """A RAM disk implementing :class:`lunsync.snapshots.device.BlockDevice`."""

    def __init__(self, num_blocks: int = 4096, block_size: int = 512, *, thin: bool = True,
                 read_only: bool = False) -> None:
        self._bs = block_size
        self._nb = num_blocks
        self._thin = thin
        self._ro = read_only
        self.data = bytearray(num_blocks * block_size)
        self.mapped = bytearray(num_blocks)
        self.flushes = 0
        self.fua_writes = 0
        self.writes = 0
        self.fail_next: StorageError | None = None

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_blocks(self) -> int:
        return self._nb

    @property
    def read_only(self) -> bool:
        return self._ro

    @property
    def thin(self) -> bool:
        return self._thin

    def _maybe_fail(self) -> None:
        exc, self.fail_next = self.fail_next, None
        if exc is not None:
            raise exc

    async def read(self, lba: int, blocks: int) -> Buffer:
        self._maybe_fail()
        if lba + blocks > self._nb:
            raise OutOfRange("read past end")
        return bytes(self.data[lba * self._bs : (lba + blocks) * self._bs])

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        self._maybe_fail()
        if self._ro:
            raise ReadOnly("read-only")
        self._store(lba, data)
        self.writes += 1
        if fua:
            self.fua_writes += 1

    def _store(self, lba: int, data: Buffer) -> None:
        n = len(data) // self._bs
        if lba + n > self._nb:
            raise OutOfRange("write past end")
        self.data[lba * self._bs : lba * self._bs + len(data)] = bytes(data)
        self.mapped[lba : lba + n] = b"\x01" * n

    async def flush(self) -> None:
        self._maybe_fail()
        self.flushes += 1

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._maybe_fail()
        for lba, n in ranges:
            self.data[lba * self._bs : (lba + n) * self._bs] = bytes(n * self._bs)
            self.mapped[lba : lba + n] = bytes(n)

    def lba_status(self, lba: int, max_extents: int = 64) -> list[LbaExtent]:
        out: list[LbaExtent] = []
        i = lba
        while i < self._nb and len(out) < max_extents:
            state = self.mapped[i]
            j = i
            while j < self._nb and self.mapped[j] == state:
                j += 1
            out.append(LbaExtent(i, j - i, bool(state)))
            i = j
        return out

    async def resize(self, num_blocks: int) -> None:
        if num_blocks > self._nb:
            self.data += bytes((num_blocks - self._nb) * self._bs)
            self.mapped += bytes(num_blocks - self._nb)
        else:
            del self.data[num_blocks * self._bs :]
            del self.mapped[num_blocks:]
        self._nb = num_blocks

    async def close(self) -> None:
        pass


class InlineMemDevice(MemDevice):
    """A MemDevice that also declares :class:`lunsync.snapshots.device.InlineWrite`, counting the writes that landed
    inline; ``inline_ok`` False makes it decline them (as a volume does while a snapshot needs a copy)."""

    def __init__(self, num_blocks: int = 4096, block_size: int = 512) -> None:
        super().__init__(num_blocks, block_size)
        self.inline_writes = 0
        self.inline_ok = True

    def write_inline(self, lba: int, data: Buffer) -> bool:
        if not self.inline_ok or self._ro:
            return False
        self._maybe_fail()
        self._store(lba, data)
        self.inline_writes += 1
        return True


IDENTITY = LunIdentity(naa=bytes.fromhex("6001405a0b1c2d3e4f5061728394a5b6"), serial="LS0001")
IDENTITY2 = LunIdentity(naa=bytes.fromhex("6001405a0b1c2d3e4f5061728394a5b7"), serial="LS0002")
NEXUS_A = Nexus("iqn.2026-01.test:a", 0x23D000000001, "iqn.2026-11.io.lunsync:demo")
NEXUS_B = Nexus("iqn.2026-01.test:b", 0x23D000000002, "iqn.2026-11.io.lunsync:demo")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def make_target(dev: MemDevice | None = None, *, aptpl_path: str | None = None) -> tuple[ScsiTarget, LogicalUnit, MemDevice]:
    dev = dev or MemDevice()
    lu = LogicalUnit(dev, IDENTITY, aptpl_path=aptpl_path, name="lun0")
    return ScsiTarget("iqn.2026-11.io.lunsync:demo", {0: lu}), lu, dev


class Session:
    """Drive a target from one nexus; the first command's POWER ON UA is consumed at construction."""

    def __init__(self, target: ScsiTarget, nexus: Nexus = NEXUS_A, lun: int = 0, *, clear_ua: bool = True) -> None:
        self.target = target
        self.nexus = nexus
        self.lun = lun
        self._tag = 0
        if clear_ua:
            self.cmd(bytes(6))

    def cmd(self, cdb: bytes | bytearray, data_out: Buffer | None = None, lun: int | None = None) -> ScsiResponse:
        self._tag += 1
        task = ScsiTask(self.nexus, self.lun if lun is None else lun, bytes(cdb), self._tag, data_out=data_out,
                        expected_in=65536)
        return asyncio.run(self.target.execute(task))


def sense_of(resp: ScsiResponse) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of a CHECK CONDITION response."""
    assert resp.sense is not None, resp
    s = resp.sense
    return s[2] & 0x0F, s[12], s[13]


def cdb10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(4, "big") + b"\x00" + blocks.to_bytes(2, "big") + b"\x00"


def cdb16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\x00\x00"

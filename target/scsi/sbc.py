"""SBC-3 block commands: READ/WRITE (6/10/12/16), WRITE AND VERIFY, VERIFY, SYNCHRONIZE CACHE, WRITE SAME, UNMAP,
GET LBA STATUS, COMPARE AND WRITE, ORWRITE, PRE-FETCH, READ CAPACITY (10/16), READ DEFECT DATA, START STOP UNIT,
PREVENT ALLOW MEDIUM REMOVAL and SANITIZE.

READ and WRITE are the hot path: each decodes its CDB with one precompiled :class:`struct.Struct`, checks the range
and hands the device's buffer straight back (reads) or the task's Data-Out buffer straight down (writes), with no
copy. With the caching page's WCE bit clear every write is FUA. A transfer shorter than the CDB asks for (iSCSI EDTL
below the SCSI transfer length) writes only the whole blocks that arrived; the transport reports the residual.
Protection information is not supported, so any non-zero RDPROTECT/WRPROTECT/VRPROTECT is INVALID FIELD IN CDB.
Every write goes through the LU's :class:`~lunsync.target.scsi.lu.WriteGate`, which costs the hot path one integer
test unless a COMPARE AND WRITE, ORWRITE or SANITIZE holds blocks exclusively.

SANITIZE runs as a task owned by the logical unit, not by the command: an ABORT TASK, a reset or a lost connection
ends the command but not the sanitize, which SBC-3 §4.33 requires to run to completion.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Final

from lunsync.snapshots.device import BlockDevice, Buffer, MappingQuery, ZeroWriter
from lunsync.snapshots.errors import StorageError
from lunsync.target.scsi import sense as S
from lunsync.target.scsi.lu import LogicalUnit, SanitizeState, WriteGate
from lunsync.target.scsi.registry import DONE, Conflict, Dir, Request, command
from lunsync.target.scsi.sense import CheckCondition, SenseKey, invalid_field, invalid_param, lba_out_of_range

_RW10: Final = struct.Struct(">xBIxH")
_RW12: Final = struct.Struct(">xBII")
_RW16: Final = struct.Struct(">xBQI")
_CAW: Final = struct.Struct(">xBQ3xB")
_LBA16: Final = struct.Struct(">2xQI")
_UNMAP_DESC: Final = struct.Struct(">QI4x")
_CHUNK: Final = 1 << 20  # WRITE SAME/VERIFY/SANITIZE work in pieces of this many bytes at most
_INVERT: Final = bytes(255 - i for i in range(256))

log = logging.getLogger(__name__)


def _fields(layout: struct.Struct, cdb: bytes) -> tuple[int, int, int]:
    """A READ/WRITE-family CDB's flags byte, LBA and transfer length as ints. ``unpack_from`` returns untyped values,
    so every test of them in the handlers would be a generic Python operation in the compiled build; this converts
    them once."""
    flags, lba, blocks = layout.unpack_from(cdb)
    return flags, lba, blocks


def _check_range(lu: LogicalUnit, lba: int, blocks: int) -> None:
    if lba + blocks > lu.device.num_blocks:
        raise lba_out_of_range()


def _read(lu: LogicalUnit, lba: int, blocks: int, len_byte: int) -> Awaitable[Buffer | None]:
    # Not a coroutine itself: it checks, then hands back the device's own read for the dispatcher to await, so a READ
    # runs one coroutine below the dispatcher rather than three (each costs a frame or a generator object per command).
    # Its CHECK CONDITIONs are raised when the handler is called, which is inside the dispatcher's try.
    dev = lu.device
    if lba + blocks > dev.num_blocks:
        raise lba_out_of_range()
    if not blocks:
        return DONE
    # 2048 blocks is never above MAXIMUM TRANSFER LENGTH (8 MiB at the 4096-byte block size, the largest), so the
    # property is only consulted for large reads.
    if blocks > 2048 and blocks > lu.max_transfer_blocks:
        raise invalid_field(len_byte)
    return dev.read(lba, blocks)


def _payload(req: Request, bs: int, blocks: int) -> tuple[Buffer | None, int]:
    """The Data-Out for ``blocks`` blocks of ``bs`` bytes: exactly those bytes, or the whole blocks that arrived if
    fewer did."""
    task = req.task
    data = task.data_out
    need = blocks * bs
    task.out_length = need
    if data is None:
        return None, 0
    have = len(data)
    if have == need:
        return data, blocks
    if have > need:
        return memoryview(data)[:need], blocks
    whole = have // bs
    if not whole:
        return None, 0
    return memoryview(data)[: whole * bs], whole


def _write(req: Request, lu: LogicalUnit, lba: int, blocks: int, fua: bool, len_byte: int) -> Awaitable[None]:
    # Not a coroutine, as _read: a write the device can land on the spot (InlineWrite: no FUA, no gate, nothing for
    # a snapshot to preserve) goes from here to pwritev and back with no coroutine below the dispatcher; any other
    # awaits the device's write in one. Its CHECK CONDITIONs and storage errors are raised inside the dispatcher's try.
    dev = lu.device
    if lu.swp or dev.read_only:
        raise S.write_protected()
    if lba + blocks > dev.num_blocks:
        raise lba_out_of_range()
    if not blocks:
        return DONE
    if blocks > 2048 and blocks > lu.max_transfer_blocks:  # as in _read
        raise invalid_field(len_byte)
    buf, n = _payload(req, dev.block_size, blocks)
    if buf is None:
        return DONE
    gate = lu.gate
    if gate.active:  # a COMPARE AND WRITE, ORWRITE or SANITIZE holds blocks: queue behind overlapping ones
        return _write_gated(gate, dev, lba, n, buf, fua or not lu.wce)
    if not fua and lu.wce:
        inline = lu.inline_write
        # Never yields, so no exclusive holder can start while it runs: it need not count itself as untracked.
        if inline is not None and inline(lba, buf):
            return DONE
    return _write_untracked(gate, dev, lba, buf, fua or not lu.wce)


async def _write_gated(gate: WriteGate, dev: BlockDevice, lba: int, n: int, buf: Buffer, fua: bool) -> None:
    async with gate.write(lba, n):
        await dev.write(lba, buf, fua)


async def _write_untracked(gate: WriteGate, dev: BlockDevice, lba: int, buf: Buffer, fua: bool) -> None:
    gate.untracked += 1
    try:
        await dev.write(lba, buf, fua)
    finally:
        gate.untracked -= 1
        if gate.active:
            gate.done_untracked()


# -- READ ----------------------------------------------------------------------------------------------------------


@command(0x08, data=Dir.IN, conflicts=Conflict.READ, name="READ(6)", usage=b"\x08\x1f\xff\xff\xff\x00")
def read_6(req: Request) -> Awaitable[Buffer | None]:
    cdb = req.cdb
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return _read(req.unit, lba, cdb[4] or 256, 4)  # SBC-3 §5.10: zero means 256 blocks


@command(0x28, data=Dir.IN, conflicts=Conflict.READ, name="READ(10)",
         usage=b"\x28\xfa\xff\xff\xff\xff\x3f\xff\xff\x00")
def read_10(req: Request) -> Awaitable[Buffer | None]:
    flags, lba, blocks = _fields(_RW10, req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return _read(req.unit, lba, blocks, 7)


@command(0xA8, data=Dir.IN, conflicts=Conflict.READ, name="READ(12)",
         usage=b"\xa8\xfa\xff\xff\xff\xff\xff\xff\xff\xff\x3f\x00")
def read_12(req: Request) -> Awaitable[Buffer | None]:
    flags, lba, blocks = _fields(_RW12, req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return _read(req.unit, lba, blocks, 6)


@command(0x88, data=Dir.IN, conflicts=Conflict.READ, name="READ(16)",
         usage=b"\x88\xfa" + b"\xff" * 12 + b"\x3f\x00")
def read_16(req: Request) -> Awaitable[Buffer | None]:
    flags, lba, blocks = _fields(_RW16, req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return _read(req.unit, lba, blocks, 10)


# -- WRITE ---------------------------------------------------------------------------------------------------------


@command(0x0A, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE(6)", usage=b"\x0a\x1f\xff\xff\xff\x00")
def write_6(req: Request) -> Awaitable[None]:
    cdb = req.cdb
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return _write(req, req.unit, lba, cdb[4] or 256, False, 4)


@command(0x2A, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE(10)",
         usage=b"\x2a\xfa\xff\xff\xff\xff\x3f\xff\xff\x00")
def write_10(req: Request) -> Awaitable[None]:
    flags, lba, blocks = _fields(_RW10, req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return _write(req, req.unit, lba, blocks, bool(flags & 0x08), 7)


@command(0xAA, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE(12)",
         usage=b"\xaa\xfa\xff\xff\xff\xff\xff\xff\xff\xff\x3f\x00")
def write_12(req: Request) -> Awaitable[None]:
    flags, lba, blocks = _fields(_RW12, req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return _write(req, req.unit, lba, blocks, bool(flags & 0x08), 6)


@command(0x8A, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE(16)",
         usage=b"\x8a\xfa" + b"\xff" * 12 + b"\x3f\x00")
def write_16(req: Request) -> Awaitable[None]:
    flags, lba, blocks = _fields(_RW16, req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    return _write(req, req.unit, lba, blocks, bool(flags & 0x08), 10)


# -- WRITE AND VERIFY, VERIFY --------------------------------------------------------------------------------------


async def _write_verify(req: Request, flags: int, lba: int, blocks: int, len_byte: int) -> None:
    if flags & 0xE0:
        raise invalid_field(1, 7)
    # The verify half reads back what the write put on stable storage, so the write goes through with FUA; a
    # successful write of the same bytes cannot then miscompare.
    await _write(req, req.unit, lba, blocks, True, len_byte)


@command(0x2E, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE AND VERIFY(10)",
         usage=b"\x2e\xf2\xff\xff\xff\xff\x3f\xff\xff\x00")
async def write_verify_10(req: Request) -> None:
    flags, lba, blocks = _fields(_RW10, req.cdb)
    await _write_verify(req, flags, lba, blocks, 7)


@command(0xAE, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE AND VERIFY(12)",
         usage=b"\xae\xf2\xff\xff\xff\xff\xff\xff\xff\xff\x3f\x00")
async def write_verify_12(req: Request) -> None:
    flags, lba, blocks = _fields(_RW12, req.cdb)
    await _write_verify(req, flags, lba, blocks, 6)


@command(0x8E, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE AND VERIFY(16)",
         usage=b"\x8e\xf2" + b"\xff" * 12 + b"\x3f\x00")
async def write_verify_16(req: Request) -> None:
    flags, lba, blocks = _fields(_RW16, req.cdb)
    await _write_verify(req, flags, lba, blocks, 10)


def first_difference(a: Buffer, b: Buffer) -> int:
    """Offset of the first differing byte of two equal-length buffers, or -1."""
    if a == b:
        return -1
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    lo, hi = 0, len(ma)
    # Bisect on slice equality: C-speed compares instead of a Python loop over every byte.
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if ma[lo:mid] != mb[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if ma[i] != mb[i]:
            return i
    return -1


async def _verify(req: Request, flags: int, lba: int, blocks: int, len_byte: int) -> None:
    lu = req.unit
    if flags & 0xE0:
        raise invalid_field(1, 7)
    bytchk = (flags >> 1) & 0x03
    if bytchk == 0x02:
        raise invalid_field(1, 2)
    _check_range(lu, lba, blocks)
    if not blocks or bytchk == 0:
        return  # medium verification: the data is readable by construction of the backing store
    if blocks > lu.max_transfer_blocks:
        raise invalid_field(len_byte)
    bs = lu.device.block_size
    data = req.task.data_out
    expect_len = bs if bytchk == 0x03 else blocks * bs
    if data is None or len(data) < expect_len:
        raise S.param_list_length_error()
    expected = memoryview(data)[:expect_len]
    medium = await lu.device.read(lba, blocks)
    if bytchk == 0x01:
        off = first_difference(memoryview(medium)[:expect_len], expected)
        if off >= 0:
            raise S.miscompare(off)
        return
    mv = memoryview(medium)
    for i in range(blocks):
        off = first_difference(mv[i * bs : (i + 1) * bs], expected)
        if off >= 0:
            raise S.miscompare(i * bs + off)


@command(0x2F, data=Dir.OUT, conflicts=Conflict.READ, name="VERIFY(10)",
         usage=b"\x2f\xf6\xff\xff\xff\xff\x3f\xff\xff\x00")
async def verify_10(req: Request) -> None:
    flags, lba, blocks = _fields(_RW10, req.cdb)
    await _verify(req, flags, lba, blocks, 7)


@command(0xAF, data=Dir.OUT, conflicts=Conflict.READ, name="VERIFY(12)",
         usage=b"\xaf\xf6\xff\xff\xff\xff\xff\xff\xff\xff\x3f\x00")
async def verify_12(req: Request) -> None:
    flags, lba, blocks = _fields(_RW12, req.cdb)
    await _verify(req, flags, lba, blocks, 6)


@command(0x8F, data=Dir.OUT, conflicts=Conflict.READ, name="VERIFY(16)",
         usage=b"\x8f\xf6" + b"\xff" * 12 + b"\x3f\x00")
async def verify_16(req: Request) -> None:
    flags, lba, blocks = _fields(_RW16, req.cdb)
    await _verify(req, flags, lba, blocks, 10)


# -- SYNCHRONIZE CACHE, PRE-FETCH ----------------------------------------------------------------------------------


async def _sync(req: Request, lba: int, blocks: int) -> None:
    lu = req.unit
    _check_range(lu, lba, blocks)
    await lu.device.flush()


@command(0x35, conflicts=Conflict.WRITE, name="SYNCHRONIZE CACHE(10)",
         usage=b"\x35\x02\xff\xff\xff\xff\x3f\xff\xff\x00", timeout_s=60)
async def synchronize_cache_10(req: Request) -> None:
    _, lba, blocks = _fields(_RW10, req.cdb)
    await _sync(req, lba, blocks)


@command(0x91, conflicts=Conflict.WRITE, name="SYNCHRONIZE CACHE(16)",
         usage=b"\x91\x02" + b"\xff" * 12 + b"\x3f\x00", timeout_s=60)
async def synchronize_cache_16(req: Request) -> None:
    _, lba, blocks = _fields(_RW16, req.cdb)
    await _sync(req, lba, blocks)


@command(0x34, conflicts=Conflict.READ, name="PRE-FETCH(10)", usage=b"\x34\x02\xff\xff\xff\xff\x3f\xff\xff\x00")
async def prefetch_10(req: Request) -> None:
    # The page cache does its own read-ahead; PRE-FETCH only checks its range and completes with GOOD.
    _, lba, blocks = _fields(_RW10, req.cdb)
    _check_range(req.unit, lba, blocks)


@command(0x90, conflicts=Conflict.READ, name="PRE-FETCH(16)", usage=b"\x90\x02" + b"\xff" * 12 + b"\x3f\x00")
async def prefetch_16(req: Request) -> None:
    _, lba, blocks = _fields(_RW16, req.cdb)
    _check_range(req.unit, lba, blocks)


# -- WRITE SAME, UNMAP, GET LBA STATUS -----------------------------------------------------------------------------


async def _write_same(req: Request, flags: int, lba: int, blocks: int, len_byte: int, ndob: bool) -> None:
    lu = req.unit
    dev = lu.device
    if flags & 0xE0:
        raise invalid_field(1, 7)
    if flags & 0x10:  # ANCHOR: anchored blocks are not supported (ANC_SUP 0)
        raise invalid_field(1, 4)
    unmap = bool(flags & 0x08)
    if lu.swp or dev.read_only:
        # Before the Data-Out check, as for WRITE: nothing is written to a protected LU, whatever came with the CDB.
        raise S.write_protected()
    bs = dev.block_size
    data = req.task.data_out
    if not ndob and (data is None or len(data) != bs):
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.INVALID_FIELD_IN_CDB)
    if blocks == 0:
        # WSNZ is 0 (VPD 0xB0): zero blocks means from ``lba`` to the end of the medium (SBC-3 §5.42), which must
        # still fit within MAXIMUM WRITE SAME LENGTH.
        if lba >= dev.num_blocks:
            raise lba_out_of_range()
        blocks = dev.num_blocks - lba
    if blocks > lu.max_write_same_blocks:
        raise invalid_field(len_byte)
    _check_range(lu, lba, blocks)
    async with lu.gate.write(lba, blocks):
        if unmap and dev.thin:
            # LBPRZ: deallocated blocks read as zeros, which is what libiscsi and initiators expect after UNMAP=1.
            await dev.unmap(((lba, blocks),))
            return
        block = bytes(bs) if ndob or data is None else bytes(data)
        if isinstance(dev, ZeroWriter) and not any(block):
            # A store that zeroes a range by itself (librbd's write-zeroes) is not sent the zeros.
            await dev.write_zeroes(lba, blocks, not lu.wce)
            return
        per = max(1, min(blocks, _CHUNK // bs))
        chunk = block * per
        fua = not lu.wce
        done = 0
        while done < blocks:
            n = min(per, blocks - done)
            await dev.write(lba + done, chunk if n == per else chunk[: n * bs], fua)
            done += n


@command(0x41, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE SAME(10)",
         usage=b"\x41\xf8\xff\xff\xff\xff\x3f\xff\xff\x00")
async def write_same_10(req: Request) -> None:
    flags, lba, blocks = _fields(_RW10, req.cdb)
    await _write_same(req, flags, lba, blocks, 7, False)


@command(0x93, data=Dir.OUT, conflicts=Conflict.WRITE, name="WRITE SAME(16)",
         usage=b"\x93\xf9" + b"\xff" * 12 + b"\x3f\x00")
async def write_same_16(req: Request) -> None:
    flags, lba, blocks = _fields(_RW16, req.cdb)
    await _write_same(req, flags, lba, blocks, 10, bool(flags & 0x01))


@command(0x42, data=Dir.OUT, conflicts=Conflict.WRITE, name="UNMAP", usage=b"\x42\x01\x00\x00\x00\x00\x3f\xff\xff\x00")
async def unmap(req: Request) -> None:
    lu = req.unit
    cdb = req.cdb
    dev = lu.device
    if not dev.thin:
        raise S.invalid_opcode()
    if cdb[1] & 0x01:  # ANCHOR
        raise invalid_field(1, 0)
    length = (cdb[7] << 8) | cdb[8]
    if length == 0:
        return
    if length < 8:
        raise S.param_list_length_error()
    data = bytes(req.task.data_out or b"")[:length]
    if len(data) < length:
        raise S.param_list_length_error()
    if lu.swp or dev.read_only:
        raise S.write_protected()
    data_len = (data[0] << 8) | data[1]
    desc_len = (data[2] << 8) | data[3]
    if data_len and data_len + 2 > length:
        raise S.param_list_length_error()
    desc_len = min(desc_len, length - 8)
    if desc_len % 16:
        raise invalid_param(2)
    count = desc_len // 16
    if count > lu.max_unmap_descriptors:
        raise invalid_param(2)
    ranges: list[tuple[int, int]] = []
    nb = dev.num_blocks
    for i in range(count):
        off = 8 + 16 * i
        lba, blocks = _UNMAP_DESC.unpack_from(data, off)
        if lba + blocks > nb:
            raise lba_out_of_range()
        if blocks > lu.max_unmap_blocks:
            raise invalid_param(off + 8)
        if blocks:
            ranges.append((lba, blocks))
    if ranges:
        first = min(r[0] for r in ranges)
        async with lu.gate.write(first, max(a + n for a, n in ranges) - first):
            await dev.unmap(ranges)


@command(0x9E, 0x12, data=Dir.IN, conflicts=Conflict.READ, name="GET LBA STATUS",
         usage=b"\x9e\x12" + b"\xff" * 12 + b"\x00\x00")
async def get_lba_status(req: Request) -> bytes:
    lu = req.unit
    lba, alloc = _LBA16.unpack_from(req.cdb)
    nb = lu.device.num_blocks
    if lba >= nb:
        raise lba_out_of_range()
    if alloc < 8:
        return b"\x00" * alloc if alloc else b""
    room = max(1, min(64, (alloc - 8) // 16))
    out = bytearray()
    if lu.thin:
        dev = lu.device
        # A store that knows its mapping only by asking over the network is awaited; the rest answer inline.
        extents = await dev.query_lba_status(lba, room) if isinstance(dev, MappingQuery) else dev.lba_status(lba, room)
        for ext in extents:
            # The device may report the extent that contains ``lba``; SBC-3 §5.6 wants the first descriptor to start
            # exactly at the requested LBA, so clip.
            start = max(ext.lba, lba)
            end = min(ext.lba + ext.blocks, nb)
            while start < end and len(out) < room * 16:
                take = min(end - start, 0xFFFFFFFF)
                out += struct.pack(">QIB3x", start, take, 0 if ext.mapped else 1)
                start += take
    if not out:
        out += struct.pack(">QIB3x", lba, min(nb - lba, 0xFFFFFFFF), 0)
    return (struct.pack(">I4x", len(out) + 4) + bytes(out))[:alloc]


# -- COMPARE AND WRITE, ORWRITE ------------------------------------------------------------------------------------


@command(0x89, data=Dir.OUT, conflicts=Conflict.WRITE, name="COMPARE AND WRITE",
         usage=b"\x89\xfa" + b"\xff" * 8 + b"\x00\x00\x00\xff\x3f\x00")
async def compare_and_write(req: Request) -> None:
    lu = req.unit
    dev = lu.device
    flags, lba, blocks = _CAW.unpack_from(req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    bs = dev.block_size
    data = req.task.data_out
    if (len(data) if data is not None else 0) != 2 * blocks * bs:
        # The Data-Out must be exactly the verify and write halves; anything else cannot be split safely.
        raise invalid_field(13)
    if blocks > lu.max_compare_and_write_blocks:
        raise invalid_field(13)
    if lu.swp or dev.read_only:
        raise S.write_protected()
    _check_range(lu, lba, blocks)
    if not blocks or data is None:
        return
    half = blocks * bs
    mv = memoryview(data)
    async with lu.gate.exclusive(lba, blocks):
        current = await dev.read(lba, blocks)
        off = first_difference(current, mv[:half])
        if off >= 0:
            raise S.miscompare(off)
        await dev.write(lba, mv[half:], bool(flags & 0x08) or not lu.wce)


@command(0x8B, data=Dir.OUT, conflicts=Conflict.WRITE, name="ORWRITE(16)",
         usage=b"\x8b\xfa" + b"\xff" * 12 + b"\x3f\x00")
async def orwrite_16(req: Request) -> None:
    lu = req.unit
    dev = lu.device
    flags, lba, blocks = _fields(_RW16, req.cdb)
    if flags & 0xE0:
        raise invalid_field(1, 7)
    if lu.swp or dev.read_only:
        raise S.write_protected()
    _check_range(lu, lba, blocks)
    if not blocks:
        return
    if blocks > lu.max_transfer_blocks:
        raise invalid_field(10)
    buf, n = _payload(req, dev.block_size, blocks)
    if buf is None:
        return
    size = n * dev.block_size
    async with lu.gate.exclusive(lba, n):
        current = await dev.read(lba, n)
        merged = (int.from_bytes(current, "little") | int.from_bytes(buf, "little")).to_bytes(size, "little")
        await dev.write(lba, merged, bool(flags & 0x08) or not lu.wce)


# -- READ CAPACITY, READ DEFECT DATA -------------------------------------------------------------------------------


@command(0x25, data=Dir.IN, conflicts=Conflict.NEVER, name="READ CAPACITY(10)",
         usage=b"\x25\x00\xff\xff\xff\xff\x00\x00\x01\x00")
async def read_capacity_10(req: Request) -> bytes:
    cdb = req.cdb
    lu = req.unit
    if not cdb[8] & 0x01 and any(cdb[2:6]):
        raise invalid_field(2)  # SBC-3 §5.16: LBA must be zero when PMI is zero
    last = lu.device.num_blocks - 1
    return struct.pack(">II", min(last, 0xFFFFFFFF), lu.device.block_size)


@command(0x9E, 0x10, data=Dir.IN, conflicts=Conflict.NEVER, name="READ CAPACITY(16)",
         usage=b"\x9e\x10" + b"\xff" * 12 + b"\x01\x00")
async def read_capacity_16(req: Request) -> bytes:
    lu = req.unit
    cdb = req.cdb
    if not cdb[14] & 0x01 and any(cdb[2:10]):
        raise invalid_field(2)
    alloc = int.from_bytes(cdb[10:14], "big")
    lbp = 0xC000 if lu.thin else 0  # LBPME, LBPRZ
    data = struct.pack(">QIBBH16x", lu.device.num_blocks - 1, lu.device.block_size, 0, lu.physical_exponent, lbp)
    return data[:alloc]


@command(0x37, data=Dir.IN, conflicts=Conflict.READ, name="READ DEFECT DATA(10)",
         usage=b"\x37\x00\x1f\x00\x00\x00\x00\xff\xff\x00")
async def read_defect_data_10(req: Request) -> bytes:
    cdb = req.cdb
    # A virtual disk has no defects: an empty list in the requested format, with PLISTV/GLISTV as asked.
    return bytes((0, cdb[2] & 0x1F, 0, 0))[: (cdb[7] << 8) | cdb[8]]


@command(0xB7, data=Dir.IN, conflicts=Conflict.READ, name="READ DEFECT DATA(12)",
         usage=b"\xb7\x1f\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00")
async def read_defect_data_12(req: Request) -> bytes:
    cdb = req.cdb
    return bytes((0, cdb[1] & 0x1F, 0, 0, 0, 0, 0, 0))[: int.from_bytes(cdb[6:10], "big")]


# -- START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL ------------------------------------------------------------------


@command(0x1B, conflicts=Conflict.WRITE, name="START STOP UNIT", usage=b"\x1b\x01\x00\x0f\xf7\x00")
async def start_stop_unit(req: Request) -> None:
    cdb = req.cdb
    if cdb[4] & 0x02:  # LOEJ: the medium is not removable, so there is nothing to load or eject
        raise invalid_field(4, 1)
    # START/STOP and power conditions have no effect on a virtual disk: it is always ready.


@command(0x1E, conflicts=Conflict.WRITE, name="PREVENT ALLOW MEDIUM REMOVAL", usage=b"\x1e\x00\x00\x00\x03\x00")
async def prevent_allow(req: Request) -> None:
    lu = req.unit
    prevent = req.cdb[4] & 0x03
    if prevent & 0x02:  # 10b and 11b are obsolete (medium changer forms)
        raise invalid_field(4, 1)
    if prevent:
        lu.prevent.add(req.task.nexus)
    else:
        lu.prevent.discard(req.task.nexus)


# -- SANITIZE (SBC-3 §5.27) ----------------------------------------------------------------------------------------

def _sanitize_usage(sa: int) -> bytes:
    """CDB USAGE DATA: IMMED and AUSE settable; byte 1 bit 6 and bytes 2-6 reserved."""
    return bytes((0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))


def _sanitize_cdb(req: Request) -> tuple[bool, bool, int]:
    """(IMMED, AUSE, PARAMETER LIST LENGTH) of a SANITIZE CDB whose reserved bits and bytes are clear."""
    cdb = req.cdb
    if cdb[1] & 0x40:
        raise invalid_field(1, 6)
    for i in range(2, 7):
        if cdb[i]:
            raise invalid_field(i)
    return bool(cdb[1] & 0x80), bool(cdb[1] & 0x20), (cdb[7] << 8) | cdb[8]


def _sanitize_admit(lu: LogicalUnit, ause: bool) -> None:
    """The checks every sanitize operation passes before it may start."""
    st = lu.sanitize
    if st is not None and st.failed and not st.ause and ause:
        # A failure in restricted completion mode is left only by a sanitize that again asks for restricted mode.
        raise invalid_field(1, 5)
    if lu.write_protected:
        raise S.write_protected()


async def _start_sanitize(lu: LogicalUnit, immed: bool, ause: bool, total: int,
                          work: Callable[[SanitizeState], Awaitable[None]]) -> None:
    """Run ``work`` as the LU's sanitize operation; wait for it unless ``immed``.

    The operation holds the whole LU exclusively in the write gate, so it starts only after in-flight writes and
    COMPARE AND WRITEs end; commands arriving meanwhile already see SANITIZE IN PROGRESS. It finishes with a flush,
    so a sanitize reported complete is durable.
    """
    st = SanitizeState(None, ause, total=max(1, total))

    async def run() -> None:
        try:
            async with lu.gate.exclusive(0, lu.num_blocks):
                await work(st)
                await lu.device.flush()
        except BaseException as exc:
            st.failed = True
            st.task = None
            if not isinstance(exc, asyncio.CancelledError):
                log.error("SANITIZE of %s failed: %s", lu.name or "LU", exc)
            raise
        st.task = None
        if lu.sanitize is st:
            lu.sanitize = None

    task = asyncio.get_running_loop().create_task(run(), name=f"sanitize {lu.name}")
    # The result matters only to a waiting command; with IMMED nobody waits, so mark the outcome retrieved.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    st.task = task
    lu.sanitize = st
    if immed:
        return
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():
            raise CheckCondition(SenseKey.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED) from None
        raise  # this command was aborted; the sanitize goes on
    except (StorageError, CheckCondition):
        raise CheckCondition(SenseKey.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED) from None


async def _fill(lu: LogicalUnit, st: SanitizeState, block: bytes) -> None:
    """Write ``block`` to every logical block, a bounded chunk at a time, yielding to the loop between chunks."""
    dev = lu.device
    nb = dev.num_blocks
    per = max(1, _CHUNK // len(block))
    chunk = block * per
    lba = 0
    while lba < nb:
        n = min(per, nb - lba)
        await dev.write(lba, chunk if n == per else memoryview(chunk)[: n * len(block)])
        lba += n
        st.done += n
        await asyncio.sleep(0)


@command(0x48, 0x01, data=Dir.OUT, conflicts=Conflict.WRITE, name="SANITIZE/OVERWRITE",
         usage=_sanitize_usage(0x01), timeout_s=3600)
async def sanitize_overwrite(req: Request) -> None:
    lu = req.unit
    immed, ause, length = _sanitize_cdb(req)
    bs = lu.block_size
    if not 4 < length < bs + 5:
        raise invalid_field(7)
    _sanitize_admit(lu, ause)
    data = bytes(req.task.data_out or b"")[:length]
    if len(data) < length:
        raise S.param_list_length_error()
    invert, test, count = bool(data[0] & 0x80), (data[0] >> 5) & 0x03, data[0] & 0x1F
    if test:
        raise invalid_param(0, 6)
    if not count:
        raise invalid_param(0, 4)
    if data[1]:
        raise invalid_param(1)
    plen = (data[2] << 8) | data[3]
    if not 0 < plen <= bs:
        raise invalid_param(2)
    if 4 + plen > length:
        raise S.param_list_length_error()
    pattern = data[4 : 4 + plen]
    block = (pattern * -(-bs // plen))[:bs]  # a pattern shorter than a block repeats to fill it

    async def work(st: SanitizeState) -> None:
        for p in range(count):
            # With INVERT the passes alternate, and the last one writes the pattern itself (SBC-3 §5.27.3).
            await _fill(lu, st, block.translate(_INVERT) if invert and (count - p) % 2 == 0 else block)

    await _start_sanitize(lu, immed, ause, count * lu.num_blocks, work)


@command(0x48, 0x02, data=Dir.OUT, conflicts=Conflict.WRITE, name="SANITIZE/BLOCK ERASE",
         usage=_sanitize_usage(0x02), timeout_s=3600)
async def sanitize_block_erase(req: Request) -> None:
    lu = req.unit
    immed, ause, length = _sanitize_cdb(req)
    if length:
        raise invalid_field(7)
    _sanitize_admit(lu, ause)

    async def work(st: SanitizeState) -> None:
        dev = lu.device
        if not dev.thin:
            # A fully provisioned store has nothing to deallocate: erase means zeros (WABEREQ 01b, reads succeed).
            await _fill(lu, st, bytes(dev.block_size))
            return
        nb, step, lba = dev.num_blocks, lu.max_unmap_blocks, 0
        while lba < nb:
            n = min(step, nb - lba)
            await dev.unmap(((lba, n),))
            lba += n
            st.done = lba
            await asyncio.sleep(0)

    await _start_sanitize(lu, immed, ause, lu.num_blocks, work)


@command(0x48, 0x1F, data=Dir.OUT, conflicts=Conflict.WRITE, name="SANITIZE/EXIT FAILURE MODE",
         usage=_sanitize_usage(0x1F))
async def sanitize_exit_failure_mode(req: Request) -> None:
    lu = req.unit
    _, _, length = _sanitize_cdb(req)
    if length:
        raise invalid_field(7)
    st = lu.sanitize
    if st is None or not st.failed:
        return  # not in failure mode: nothing to leave
    if not st.ause:
        raise invalid_field(1, 4)  # restricted completion mode: only a successful sanitize ends it
    lu.sanitize = None

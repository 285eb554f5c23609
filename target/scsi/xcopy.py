"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.3, §6.18).

The copy manager understands identification CSCD descriptors (0xE4) that name a logical unit by an NAA designator
from its VPD 0x83 page, and block-to-block segment descriptors (0x02). A CSCD resolves only to a logical unit that the
same :class:`~lunsync.target.scsi.target.ScsiTarget` exposes to the requesting I_T nexus, so one initiator can never
copy into or out of another's LUNs. The copy runs synchronously inside the command, in chunks, and its outcome is kept
per (initiator port, list identifier) for RECEIVE COPY RESULTS. The limits reported by OPERATING PARAMETERS and VPD
0x8F are the ones enforced here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lunsync.snapshots.errors import StorageError
from lunsync.target.scsi import sense as S
from lunsync.target.scsi.lu import CopyResult, LogicalUnit
from lunsync.target.scsi.registry import Conflict, Dir, Request, command
from lunsync.target.scsi.sense import CheckCondition, SenseKey, invalid_field, invalid_param
from lunsync.target.scsi.spc import (
    XCOPY_MAX_CSCD,
    XCOPY_MAX_DESC_LIST,
    XCOPY_MAX_SEGMENT_BYTES,
    XCOPY_MAX_SEGMENTS,
)

_HEADER = struct.Struct(">BBH4xII")  # SPC-4 Table 102: list id, flags, CSCD list length, segment list length, inline
_B2B = struct.Struct(">BBHHH2xHQQ")  # SPC-4 §6.3.7.5, block device to block device, 28 bytes
_CSCD_LEN = 32
_CHUNK_BYTES = 1 << 20
_MAX_DESC_LIST = XCOPY_MAX_DESC_LIST


@dataclass(frozen=True, slots=True)
class _Segment:
    src: int
    dst: int
    blocks: int
    src_lba: int
    dst_lba: int
    offset: int  # in the parameter list, for the segment pointer in sense


@dataclass(slots=True)
class XcopyCounters:
    """EXTENDED COPY refusals for the whole process; :mod:`lunsync.provider.metrics` reads them."""

    # A CSCD that names no logical unit this nexus may see: another target's LUN (CVE-2020-28374) or none at all.
    unreachable_cscd: int = 0


COUNTERS = XcopyCounters()


def _copy_aborted(asc: S.Asc) -> CheckCondition:
    return CheckCondition(SenseKey.COPY_ABORTED, asc)


def _resolve(req: Request, data: bytes, off: int) -> LogicalUnit:
    """Turn one 0xE4 CSCD descriptor into a logical unit of this target visible to this nexus."""
    b1 = data[off + 1]
    # LU ID TYPE (bits 7-6) says how the copy manager would address the LU through an initiator port; the designator
    # alone identifies it here, so the field is not consulted (libiscsi expects any value to be accepted).
    if b1 & 0x1F != 0:  # PERIPHERAL DEVICE TYPE: block devices only
        raise invalid_param(off + 1, 4)
    if b1 & 0x20:  # NUL: a null device can neither source nor sink blocks here
        raise _copy_aborted(S.COPY_TARGET_DEVICE_NOT_REACHABLE)
    code_set = data[off + 4] & 0x0F
    desig_type = data[off + 5] & 0x0F
    length = data[off + 7]
    if length > 20:
        raise invalid_param(off + 7)
    designator = bytes(data[off + 8 : off + 8 + length])
    block_len = int.from_bytes(data[off + 29 : off + 32], "big")
    for lu in req.target.luns_for(req.task.nexus).values():
        if code_set == 0x1 and desig_type == 0x3 and designator == bytes(lu.identity.naa):
            if block_len not in (0, lu.block_size):
                raise invalid_param(off + 29)
            return lu
    COUNTERS.unreachable_cscd += 1
    raise _copy_aborted(S.COPY_TARGET_DEVICE_NOT_REACHABLE)


def _parse(req: Request, data: bytes) -> tuple[int, list[LogicalUnit | None], list[_Segment]]:
    list_id, _flags, cscd_len, seg_len, inline_len = _HEADER.unpack_from(data, 0)
    if inline_len:
        raise invalid_param(12)
    if 16 + cscd_len + seg_len > len(data):
        raise S.param_list_length_error()
    if cscd_len + seg_len > _MAX_DESC_LIST:
        raise S.param_list_length_error()
    if cscd_len % _CSCD_LEN:
        raise invalid_param(2)
    n_cscd = cscd_len // _CSCD_LEN
    if n_cscd > XCOPY_MAX_CSCD:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.TOO_MANY_TARGET_DESCRIPTORS)
    cscds: list[LogicalUnit | None] = []
    off = 16
    for _ in range(n_cscd):
        code = data[off]
        if code != 0xE4:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE,
                                 field_pointer=off, in_cdb=False)
        cscds.append(None)  # resolved below, after all descriptor codes are known to be supported
        off += _CSCD_LEN
    segments: list[_Segment] = []
    end = 16 + cscd_len + seg_len
    while off < end:
        if len(segments) >= XCOPY_MAX_SEGMENTS:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.TOO_MANY_SEGMENT_DESCRIPTORS)
        if end - off < 4:
            raise S.param_list_length_error()
        code = data[off]
        desc_len = 4 + int.from_bytes(data[off + 2 : off + 4], "big")
        if code != 0x02:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, S.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE,
                                 field_pointer=off, in_cdb=False)
        if desc_len != _B2B.size or off + desc_len > end:
            raise S.param_list_length_error()
        _, _, _, src, dst, blocks, src_lba, dst_lba = _B2B.unpack_from(data, off)
        segments.append(_Segment(src, dst, blocks, src_lba, dst_lba, off))
        off += desc_len
    for i in range(n_cscd):
        cscds[i] = _resolve(req, data, 16 + i * _CSCD_LEN)
    return list_id, cscds, segments


async def _copy_segment(src: LogicalUnit, dst: LogicalUnit, seg: _Segment) -> int:
    bs = src.block_size
    if seg.src_lba + seg.blocks > src.num_blocks or seg.dst_lba + seg.blocks > dst.num_blocks:
        raise _copy_aborted(S.NO_ADDITIONAL_SENSE)
    if seg.blocks * bs > XCOPY_MAX_SEGMENT_BYTES:
        raise invalid_param(seg.offset + 10)
    if dst.write_protected:
        raise S.write_protected()
    per = max(1, _CHUNK_BYTES // bs)
    done = 0
    fua = not dst.wce
    async with dst.gate.write(seg.dst_lba, seg.blocks):  # ordered against COMPARE AND WRITE like any other write
        while done < seg.blocks:
            n = min(per, seg.blocks - done)
            buf = await src.device.read(seg.src_lba + done, n)
            await dst.device.write(seg.dst_lba + done, buf, fua)
            done += n
    return done


@command(0x83, 0x00, data=Dir.OUT, conflicts=Conflict.WRITE, name="EXTENDED COPY(LID1)", timeout_s=120,
         usage=b"\x83\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00")
async def extended_copy(req: Request) -> None:
    lu = req.unit
    length = int.from_bytes(req.cdb[10:14], "big")
    if length == 0:
        return
    if length < 16:
        raise S.param_list_length_error()
    data = bytes(req.task.data_out or b"")[:length]
    if len(data) < length:
        raise S.param_list_length_error()
    list_id, cscds, segments = _parse(req, data)
    key = (req.task.nexus.initiator_port, list_id)
    processed = 0
    blocks = 0
    try:
        for seg in segments:
            if seg.src >= len(cscds) or seg.dst >= len(cscds):
                raise _copy_aborted(S.UNREACHABLE_COPY_TARGET)
            src, dst = cscds[seg.src], cscds[seg.dst]
            assert src is not None and dst is not None
            if src.block_size != dst.block_size:
                raise invalid_param(seg.offset)
            blocks += await _copy_segment(src, dst, seg)
            processed += 1
    except (CheckCondition, StorageError):
        lu.copy_results[key] = CopyResult(0x02, processed, blocks * lu.block_size)
        raise
    lu.copy_results[key] = CopyResult(0x01, processed, blocks * lu.block_size)


@command(0x84, 0x00, data=Dir.IN, conflicts=Conflict.READ, name="RECEIVE COPY RESULTS/COPY STATUS",
         usage=b"\x84\x00\xff\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00")
async def receive_copy_status(req: Request) -> bytes:
    lu = req.unit
    cdb = req.cdb
    result = lu.copy_results.get((req.task.nexus.initiator_port, cdb[2]))
    if result is None:
        raise invalid_field(2)
    count = result.transfer_count
    units = 0x00  # bytes
    if count > 0xFFFFFFFF:
        count, units = count >> 10, 0xF1  # kibibytes
    data = struct.pack(">IBHBI", 8, result.status, result.segments_processed, units, count)
    return data[: int.from_bytes(cdb[10:14], "big")]


@command(0x84, 0x03, data=Dir.IN, conflicts=Conflict.READ, name="RECEIVE COPY RESULTS/OPERATING PARAMETERS",
         usage=b"\x84\x03\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00")
async def receive_copy_operating_parameters(req: Request) -> bytes:
    implemented = bytes((0x02, 0xE4))
    body = struct.pack(
        ">B3xHHIIIII2xHBBBB3xB",
        0,  # SNLID: list identifiers are not held beyond the copy
        XCOPY_MAX_CSCD,
        XCOPY_MAX_SEGMENTS,
        _MAX_DESC_LIST,
        XCOPY_MAX_SEGMENT_BYTES,
        0,  # MAXIMUM INLINE DATA LENGTH
        0,  # HELD DATA LIMIT
        0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE
        1,  # TOTAL CONCURRENT COPIES
        1,  # MAXIMUM CONCURRENT COPIES
        9,  # DATA SEGMENT GRANULARITY: 512 bytes (log2)
        0,
        0,
        len(implemented),
    ) + implemented
    return (len(body).to_bytes(4, "big") + body)[: int.from_bytes(req.cdb[10:14], "big")]

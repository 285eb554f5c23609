"""The iSCSI PDU codec (RFC 7143 §11): pure encode and decode, no I/O, no clock.

Each PDU type is a frozen, slotted dataclass with a precompiled ``struct.Struct`` for its 48-byte Basic Header Segment.
:func:`decode` turns a BHS (plus its data segment) into the initiator-side PDU types; the ``encode`` methods of the
target-side types return the BHS bytes. Framing (AHS, padding, digests) lives in :func:`frame_length` and
:func:`frame`, so the connection can send header, data and padding as one vectored write without concatenation.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

import crc32c as _crc32c

BHS_LEN: Final = 48
DIGEST_LEN: Final = 4
RSVD_TAG: Final = 0xFFFFFFFF

_U32: Final = struct.Struct("<I")


class Op(enum.IntEnum):
    """Opcodes (RFC 7143 §11.2.1.2)."""

    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TMF_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TMF_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


INITIATOR_OPS: Final = frozenset(
    {Op.NOP_OUT, Op.SCSI_CMD, Op.TMF_REQ, Op.LOGIN_REQ, Op.TEXT_REQ, Op.DATA_OUT, Op.LOGOUT_REQ, Op.SNACK}
)


class RejectReason(enum.IntEnum):
    """Reject reasons (RFC 7143 §11.17.1)."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class DecodeError(ValueError):
    """The bytes are not a well-formed initiator PDU. ``reason`` is the Reject reason to answer with."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


# -- helpers ----------------------------------------------------------------------------------------------------------


def crc32c(*parts: bytes | bytearray | memoryview) -> int:
    """CRC32C over the concatenation of ``parts`` (RFC 7143 §13.1), without concatenating."""
    crc = 0
    for p in parts:
        crc = _crc32c.crc32c(p, crc)
    return crc


def digest_bytes(crc: int) -> bytes:
    """The wire form of a digest: the CRC's least significant byte first, as every initiator sends it."""
    return _U32.pack(crc)


def pad_len(n: int) -> int:
    """Bytes of padding after a data segment of ``n`` bytes (RFC 7143 §11.1)."""
    return -n & 3


_PAD: Final = (b"", b"\0\0\0", b"\0\0", b"\0")


def padding(n: int) -> bytes:
    return _PAD[n & 3]


def encode_lun(lun: int) -> bytes:
    """SAM-5 single-level LUN: peripheral addressing below 256, flat addressing up to 16383."""
    if lun < 256:
        return bytes((0, lun, 0, 0, 0, 0, 0, 0))
    return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))


def decode_lun(raw: int) -> int:
    """Decode the 8-byte LUN field (as a big-endian integer). Unsupported address methods map to -1."""
    b0 = (raw >> 56) & 0xFF
    b1 = (raw >> 48) & 0xFF
    method = b0 >> 6
    if method == 0:
        return b1 if (b0 & 0x3F) == 0 else -1
    if method == 1:
        return ((b0 & 0x3F) << 8) | b1
    return -1


def frame_length(bhs: bytes | bytearray | memoryview, header_digest: bool, data_digest: bool) -> int:
    """Total bytes of the PDU whose BHS is ``bhs``: BHS, AHS, digests, data and padding."""
    return frame_size(bhs[4] * 4, (bhs[5] << 16) | (bhs[6] << 8) | bhs[7], header_digest, data_digest)


def frame_size(ahs_length: int, data_length: int, header_digest: bool, data_digest: bool) -> int:
    """:func:`frame_length` from the BHS's two length fields, for a caller that has read them already."""
    n = BHS_LEN + ahs_length + (DIGEST_LEN if header_digest else 0)
    if data_length:
        n += data_length + pad_len(data_length) + (DIGEST_LEN if data_digest else 0)
    return n


def data_segment_length(bhs: bytes | bytearray | memoryview) -> int:
    return (bhs[5] << 16) | (bhs[6] << 8) | bhs[7]


def frame(
    bhs: bytes | bytearray, data: bytes | bytearray | memoryview | None, header_digest: bool, data_digest: bool
) -> list[bytes | bytearray | memoryview]:
    """The buffers of one outgoing PDU, ready for a vectored write: BHS, [digest], data, pad, [digest]."""
    out: list[bytes | bytearray | memoryview] = [bhs]
    if header_digest:
        out.append(digest_bytes(crc32c(bhs)))
    if data is not None and len(data):
        out.append(data)
        pad = padding(len(data))
        if pad:
            out.append(pad)
        if data_digest:
            out.append(digest_bytes(crc32c(data, pad)))
    return out


def _dlen_bytes(n: int) -> tuple[int, int, int]:
    return (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF


# -- initiator PDUs (decoded) -----------------------------------------------------------------------------------------

# Every initiator BHS shares: opcode+I, flags, 2 specific bytes, TotalAHSLength, DataSegmentLength, 8 bytes, ITT.
_COMMON: Final = struct.Struct(">BBBBIQI")  # 20 bytes; word 4 is TotalAHSLength<<24 | DataSegmentLength
# RFC 7143 §11.3, the whole BHS: opcode+I, flags, 2 reserved, word 4, LUN, ITT, EDTL, CmdSN, ExpStatSN, CDB. One call
# per command, as it arrives once per command.
_SCSI_CMD: Final = struct.Struct(">BB2xIQIIII16s")
_TMF: Final = struct.Struct(">IIIII")  # §11.5: RTT, CmdSN, ExpStatSN, RefCmdSN, ExpDataSN
_DATA_OUT: Final = struct.Struct(">IIIIII")  # §11.7: TTT, rsvd, ExpStatSN, rsvd, DataSN, BufferOffset
_LOGIN_REQ: Final = struct.Struct(">6sHIHxxII")  # §11.12 from byte 8: ISID, TSIH, ITT, CID, CmdSN, ExpStatSN
_TEXT_REQ: Final = struct.Struct(">III")  # §11.10: TTT, CmdSN, ExpStatSN
_LOGOUT_REQ: Final = struct.Struct(">HxxII")  # §11.14: CID, CmdSN, ExpStatSN
_NOP_OUT: Final = struct.Struct(">III")  # §11.18: TTT, CmdSN, ExpStatSN
_SNACK: Final = struct.Struct(">I4xI8xII")  # §11.16, from byte 20: TTT, ExpStatSN, BegRun, RunLength


# ScsiCommand and DataOut arrive once per command (or more): they are slotted but not frozen, because a frozen
# dataclass's __init__ costs about five times as much. Treat them as immutable all the same. Their __init__ is written
# out: dataclass() keeps one the class defines, and a generated one is interpreted even in the compiled build (mypyc
# compiles only what is in the source), at 1.5 us a PDU against 0.1 us for the compiled one.
@dataclass(slots=True)
class ScsiCommand:
    """SCSI Command PDU (RFC 7143 §11.3)."""

    immediate: bool
    final: bool
    read: bool
    write: bool
    attr: int
    lun: int
    itt: int
    expected_length: int
    cmd_sn: int
    exp_stat_sn: int
    cdb: bytes
    ahs_length: int
    data_segment_length: int

    def __init__(self, immediate: bool, final: bool, read: bool, write: bool, attr: int, lun: int, itt: int,
                 expected_length: int, cmd_sn: int, exp_stat_sn: int, cdb: bytes, ahs_length: int,
                 data_segment_length: int) -> None:
        self.immediate = immediate
        self.final = final
        self.read = read
        self.write = write
        self.attr = attr
        self.lun = lun
        self.itt = itt
        self.expected_length = expected_length
        self.cmd_sn = cmd_sn
        self.exp_stat_sn = exp_stat_sn
        self.cdb = cdb
        self.ahs_length = ahs_length
        self.data_segment_length = data_segment_length


@dataclass(slots=True)
class DataOut:
    """SCSI Data-Out PDU (RFC 7143 §11.7)."""

    final: bool
    lun: int
    itt: int
    ttt: int
    exp_stat_sn: int
    data_sn: int
    buffer_offset: int
    data_segment_length: int

    def __init__(self, final: bool, lun: int, itt: int, ttt: int, exp_stat_sn: int, data_sn: int, buffer_offset: int,
                 data_segment_length: int) -> None:  # written out, as ScsiCommand's
        self.final = final
        self.lun = lun
        self.itt = itt
        self.ttt = ttt
        self.exp_stat_sn = exp_stat_sn
        self.data_sn = data_sn
        self.buffer_offset = buffer_offset
        self.data_segment_length = data_segment_length


@dataclass(frozen=True, slots=True)
class TaskMgmtRequest:
    """Task Management Function Request (RFC 7143 §11.5)."""

    immediate: bool
    function: int
    lun: int
    itt: int
    rtt: int
    cmd_sn: int
    exp_stat_sn: int
    ref_cmd_sn: int
    exp_data_sn: int


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """Login Request (RFC 7143 §11.12)."""

    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_min: int
    isid: int
    tsih: int
    itt: int
    cid: int
    cmd_sn: int
    exp_stat_sn: int
    data_segment_length: int


@dataclass(frozen=True, slots=True)
class TextRequest:
    """Text Request (RFC 7143 §11.10)."""

    immediate: bool
    final: bool
    cont: bool
    lun: int
    itt: int
    ttt: int
    cmd_sn: int
    exp_stat_sn: int
    data_segment_length: int


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    """Logout Request (RFC 7143 §11.14)."""

    immediate: bool
    reason: int
    itt: int
    cid: int
    cmd_sn: int
    exp_stat_sn: int


@dataclass(frozen=True, slots=True)
class NopOut:
    """NOP-Out (RFC 7143 §11.18)."""

    immediate: bool
    lun: int
    itt: int
    ttt: int
    cmd_sn: int
    exp_stat_sn: int
    data_segment_length: int


@dataclass(frozen=True, slots=True)
class Snack:
    """SNACK Request (RFC 7143 §11.16). Only parsed so it can be rejected: lunsync runs ErrorRecoveryLevel 0."""

    type: int
    itt: int
    ttt: int
    exp_stat_sn: int
    beg_run: int
    run_length: int


InitiatorPdu = ScsiCommand | DataOut | TaskMgmtRequest | LoginRequest | TextRequest | LogoutRequest | NopOut | Snack


def opcode_of(bhs: bytes | bytearray | memoryview) -> int:
    return bhs[0] & 0x3F


def decode_scsi_command(bhs: bytes | bytearray | memoryview, at: int) -> ScsiCommand:
    """:func:`decode` of a BHS known to be a SCSI Command's (RFC 7143 §11.3), whole at offset ``at``: the connection
    calls it directly, once per command, having read the opcode and checked the length itself."""
    # Declared, because unpack_from's values are untyped: as ints, the tests below are native operations in the
    # compiled build rather than a generic Python operation (and a new int object) each.
    b0: int
    flags: int
    word4: int
    word8: int
    cdb: bytes
    b0, flags, word4, word8, itt, edtl, cmd_sn, exp_stat_sn, cdb = _SCSI_CMD.unpack_from(bhs, at)
    # LUN 0-255 in the peripheral form (the common case) is byte 1 with every other byte zero; the mask is tested in
    # two pieces that are each a small native int, where one 64-bit mask would be a Python long operation.
    if not (word8 >> 48) & 0xFF00 and not word8 & 0xFFFF_FFFF_FFFF:
        lun = (word8 >> 48) & 0xFF
    else:
        lun = decode_lun(word8)
    return ScsiCommand(
        bool(b0 & 0x40), bool(flags & 0x80), bool(flags & 0x40), bool(flags & 0x20), flags & 0x07,
        lun, itt, edtl, cmd_sn, exp_stat_sn, cdb, (word4 >> 24) * 4, word4 & 0xFFFFFF,
    )


def decode(bhs: bytes | bytearray | memoryview, at: int = 0) -> InitiatorPdu:
    """Decode the 48-byte initiator BHS at offset ``at`` of ``bhs`` (the receive buffer is decoded in place, with no
    slice per PDU). Raises :class:`DecodeError` for anything a target must not accept."""
    if at < 0 or len(bhs) - at < BHS_LEN:
        raise DecodeError("short basic header segment")
    if bhs[at] & 0x3F == 0x01:  # SCSI Command: the hot path, so plain ints rather than enum comparisons
        return decode_scsi_command(bhs, at)
    b0, flags, s2, s3, word4, word8, itt = _COMMON.unpack_from(bhs, at)
    op = b0 & 0x3F
    immediate = bool(b0 & 0x40)
    dlen = word4 & 0xFFFFFF
    if op == 0x05:
        ttt, _, exp_stat_sn, _, data_sn, offset = _DATA_OUT.unpack_from(bhs, at + 20)
        return DataOut(bool(flags & 0x80), decode_lun(word8), itt, ttt, exp_stat_sn, data_sn, offset, dlen)
    if op == Op.NOP_OUT:
        ttt, cmd_sn, exp_stat_sn = _NOP_OUT.unpack_from(bhs, at + 20)
        return NopOut(immediate, decode_lun(word8), itt, ttt, cmd_sn, exp_stat_sn, dlen)
    if op == Op.LOGIN_REQ:
        isid_b, tsih, itt, cid, cmd_sn, exp_stat_sn = _LOGIN_REQ.unpack_from(bhs, at + 8)
        return LoginRequest(
            bool(flags & 0x80), bool(flags & 0x40), (flags >> 2) & 3, flags & 3, s2, s3,
            int.from_bytes(isid_b, "big"), tsih, itt, cid, cmd_sn, exp_stat_sn, dlen,
        )
    if op == Op.TEXT_REQ:
        ttt, cmd_sn, exp_stat_sn = _TEXT_REQ.unpack_from(bhs, at + 20)
        return TextRequest(
            immediate, bool(flags & 0x80), bool(flags & 0x40), decode_lun(word8), itt, ttt, cmd_sn, exp_stat_sn, dlen
        )
    if op == Op.TMF_REQ:
        rtt, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn = _TMF.unpack_from(bhs, at + 20)
        return TaskMgmtRequest(
            immediate, flags & 0x7F, decode_lun(word8), itt, rtt, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn
        )
    if op == Op.LOGOUT_REQ:
        cid, cmd_sn, exp_stat_sn = _LOGOUT_REQ.unpack_from(bhs, at + 20)
        return LogoutRequest(immediate, flags & 0x7F, itt, cid, cmd_sn, exp_stat_sn)
    if op == Op.SNACK:
        ttt, exp_stat_sn, beg_run, run_length = _SNACK.unpack_from(bhs, at + 20)
        return Snack(flags & 0x0F, itt, ttt, exp_stat_sn, beg_run, run_length)
    raise DecodeError(f"opcode 0x{op:02x} is not an initiator opcode", RejectReason.PROTOCOL_ERROR)


# -- target PDUs (encoded) --------------------------------------------------------------------------------------------

_SCSI_RSP: Final = struct.Struct(">BBBBI8xIIIIIIII")  # §11.4; word 4 is TotalAHSLength<<24 | DataSegmentLength
_DATA_IN: Final = struct.Struct(">BBxBIQIIIIIIII")  # §11.7; word 4 is TotalAHSLength<<24 | DataSegmentLength
_R2T: Final = struct.Struct(">BBxxB3sQIIIIIIII")  # §11.8
_NOP_IN: Final = struct.Struct(">BBxxB3sQIIIII12x")  # §11.19
_TMF_RSP: Final = struct.Struct(">BBBxB3s8xI4xIII12x")  # §11.6
_LOGIN_RSP: Final = struct.Struct(">BBBBB3s6sHI4xIIIBB10x")  # §11.13
_TEXT_RSP: Final = struct.Struct(">BBxxB3sQIIIII12x")  # §11.11
_LOGOUT_RSP: Final = struct.Struct(">BBBxB3s8xI4xIII4xHH4x")  # §11.15
_REJECT: Final = struct.Struct(">BBBxB3s8xI4xIIII8x")  # §11.17
_ASYNC: Final = struct.Struct(">BBxxB3sQI4xIIIBBHHH4x")  # §11.9
# The two answers of nearly every command, with their constant fields left to pad bytes or one bytes argument: the
# encoder converts only what varies (7 and 8 arguments instead of 13).
_GOOD_RSP: Final = struct.Struct(">2sxB12xI4xIIII8x")  # §11.4: no residual, no data segment, COMMAND COMPLETED
_READ_ANSWER: Final = struct.Struct(">2s2xIQIIIII12x")  # §11.7: final, status folded in, GOOD, DataSN 0, offset 0
_RSP_OP_FLAGS: Final = bytes((0x21, 0x80))
_READ_OP_FLAGS: Final = bytes((0x25, 0x81))


def _lun_word(lun: int) -> int:
    """The 8-byte LUN field as an integer, without building bytes (this runs once per Data-In PDU)."""
    if 0 <= lun < 256:
        return lun << 48
    if lun < 0:
        return 0
    return ((0x40 | (lun >> 8)) << 56) | ((lun & 0xFF) << 48)


@dataclass(slots=True)  # one per write: not frozen, for the same reason as ScsiCommand
class ScsiResponse:
    """SCSI Response (RFC 7143 §11.4). The data segment, if any, is SenseLength + sense data."""

    itt: int
    status: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    response: int = 0
    overflow: bool = False
    underflow: bool = False
    residual: int = 0
    exp_data_sn: int = 0
    data_segment_length: int = 0

    def __init__(self, itt: int, status: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, response: int = 0,
                 overflow: bool = False, underflow: bool = False, residual: int = 0, exp_data_sn: int = 0,
                 data_segment_length: int = 0) -> None:  # written out, as ScsiCommand's
        self.itt = itt
        self.status = status
        self.stat_sn = stat_sn
        self.exp_cmd_sn = exp_cmd_sn
        self.max_cmd_sn = max_cmd_sn
        self.response = response
        self.overflow = overflow
        self.underflow = underflow
        self.residual = residual
        self.exp_data_sn = exp_data_sn
        self.data_segment_length = data_segment_length

    def encode(self) -> bytes:
        flags = 0x80 | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0)
        return _SCSI_RSP.pack(
            0x21, flags, self.response, self.status, self.data_segment_length,
            self.itt, 0, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn, self.exp_data_sn, 0, self.residual,
        )


def encode_scsi_response(itt: int, status: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
                         exp_data_sn: int = 0) -> bytes:
    """A SCSI Response with no residual, no data segment and response COMMAND COMPLETED: the common write's answer,
    without building a :class:`ScsiResponse` first. ``exp_data_sn`` counts the R2Ts sent for the write (§11.4.8)."""
    return _GOOD_RSP.pack(_RSP_OP_FLAGS, status, itt, stat_sn, exp_cmd_sn, max_cmd_sn, exp_data_sn)


def encode_read_answer(itt: int, lun: int, length: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int) -> bytes:
    """The common read's one Data-In: final, GOOD status folded in, no residual (what :func:`encode_data_in` gives
    for ``data_sn=0, offset=0, final=True, status=0``), without the keyword handling of the general encoder."""
    return _READ_ANSWER.pack(_READ_OP_FLAGS, length, _lun_word(lun), itt, RSVD_TAG, stat_sn, exp_cmd_sn, max_cmd_sn)


def encode_data_in(
    itt: int, lun: int, data_sn: int, offset: int, length: int, final: bool, *, status: int | None = None,
    stat_sn: int = 0, exp_cmd_sn: int = 0, max_cmd_sn: int = 0, overflow: bool = False, underflow: bool = False,
    residual: int = 0,
) -> bytes:
    """SCSI Data-In BHS (RFC 7143 §11.7). ``status`` not None sets the S bit (status folded in; F must be set)."""
    flags = 0x80 if final else 0
    st = 0
    if status is not None:
        flags |= 0x01 | (0x04 if overflow else 0) | (0x02 if underflow else 0)
        st = status
    else:
        stat_sn = 0
        residual = 0
    return _DATA_IN.pack(
        0x25, flags, st, length, _lun_word(lun), itt, RSVD_TAG, stat_sn,
        exp_cmd_sn, max_cmd_sn, data_sn, offset, residual,
    )


def encode_r2t(
    itt: int, lun: int, ttt: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, r2t_sn: int, offset: int,
    length: int,
) -> bytes:
    """R2T (RFC 7143 §11.8)."""
    return _R2T.pack(
        Op.R2T, 0x80, 0, b"\0\0\0", _lun_word(lun), itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, r2t_sn, offset, length
    )


def encode_nop_in(
    itt: int, ttt: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, lun: int = 0, length: int = 0
) -> bytes:
    """NOP-In (RFC 7143 §11.19)."""
    return _NOP_IN.pack(
        Op.NOP_IN, 0x80, 0, bytes(_dlen_bytes(length)), _lun_word(lun), itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn
    )


def encode_tmf_response(itt: int, response: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int) -> bytes:
    """Task Management Function Response (RFC 7143 §11.6)."""
    return _TMF_RSP.pack(Op.TMF_RSP, 0x80, response, 0, b"\0\0\0", itt, stat_sn, exp_cmd_sn, max_cmd_sn)


def encode_login_response(
    *, transit: bool, cont: bool, csg: int, nsg: int, isid: int, tsih: int, itt: int, stat_sn: int,
    exp_cmd_sn: int, max_cmd_sn: int, status_class: int, status_detail: int, length: int, version_max: int = 0,
    version_active: int = 0,
) -> bytes:
    """Login Response (RFC 7143 §11.13)."""
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | ((csg & 3) << 2) | (nsg & 3 if transit else 0)
    return _LOGIN_RSP.pack(
        Op.LOGIN_RSP, flags, version_max, version_active, 0, bytes(_dlen_bytes(length)), isid.to_bytes(6, "big"),
        tsih, itt, stat_sn, exp_cmd_sn, max_cmd_sn, status_class, status_detail,
    )


def encode_text_response(
    *, final: bool, cont: bool, lun: int, itt: int, ttt: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
    length: int,
) -> bytes:
    """Text Response (RFC 7143 §11.11)."""
    flags = (0x80 if final else 0) | (0x40 if cont else 0)
    return _TEXT_RSP.pack(
        Op.TEXT_RSP, flags, 0, bytes(_dlen_bytes(length)), _lun_word(lun), itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn
    )


def encode_logout_response(
    itt: int, response: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, time2wait: int = 0, time2retain: int = 0
) -> bytes:
    """Logout Response (RFC 7143 §11.15)."""
    return _LOGOUT_RSP.pack(
        Op.LOGOUT_RSP, 0x80, response, 0, b"\0\0\0", itt, stat_sn, exp_cmd_sn, max_cmd_sn, time2wait, time2retain
    )


def encode_reject(reason: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, data_sn: int = 0) -> bytes:
    """Reject (RFC 7143 §11.17); its data segment is the rejected PDU's 48-byte header."""
    return _REJECT.pack(
        Op.REJECT, 0x80, reason, 0, bytes(_dlen_bytes(BHS_LEN)), RSVD_TAG, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn
    )


def encode_async(
    event: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, *, lun: int = 0, vcode: int = 0,
    p1: int = 0, p2: int = 0, p3: int = 0, length: int = 0,
) -> bytes:
    """Asynchronous Message (RFC 7143 §11.9). Event 1 asks the initiator to log out; p3 is Time2Retain."""
    return _ASYNC.pack(
        Op.ASYNC, 0x80, 0, bytes(_dlen_bytes(length)), _lun_word(lun), RSVD_TAG, stat_sn, exp_cmd_sn, max_cmd_sn,
        event, vcode, p1, p2, p3,
    )

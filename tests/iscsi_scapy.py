"""A scapy layer for iSCSI (RFC 7143 §11) and a tiny blocking initiator built on it.

The layer owns the wire layouts the tests need to speak iSCSI to a live target *badly* on purpose: every PDU type of
RFC 7143 §11 is a :class:`BHS` subclass, picked by opcode when dissecting, and every length, digest and padding field
can be set to a lie. Left at ``None`` they are filled in from the real contents when the packet is built. Digests are
not announced on the wire, so a packet carries ``header_digest_on``/``data_digest_on`` flags (keyword arguments when
building or dissecting) that say whether the CRC32C words are present. :class:`RawInitiator` is a synchronous socket
client, enough for malformed-PDU and fuzz tests to log in, poke, and check that the target still answers properly.
It is a test tool, not an initiator: one connection, one outstanding command, no error recovery.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import crc32c as _crc32c
from scapy.fields import (
    BitEnumField,
    BitField,
    ByteEnumField,
    ByteField,
    ConditionalField,
    Field,
    FlagsField,
    IntField,
    ShortField,
    StrFixedLenField,
    StrLenField,
    X3BytesField,
    XBitField,
    XByteField,
    XIntField,
    XLEIntField,
    XLongField,
    XShortField,
)
from scapy.layers.inet import TCP
from scapy.packet import Packet, Raw, bind_layers

BHS_LEN = 48
ISCSI_PORT = 3260
RESERVED_TAG = 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """The iSCSI digest (RFC 7143 §13.1, generator 0x11edc6f41). On the wire it is little-endian."""
    return int(_crc32c.crc32c(bytes(data)))


def pad4(n: int) -> int:
    """Bytes of padding after an ``n``-byte data segment (RFC 7143 §11.2.3)."""
    return (-n) % 4


# RFC 7143 §11.2.1.2. Initiator opcodes are 0x00-0x1f, target opcodes 0x20-0x3f.
class Op:
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


OPCODES = {v: k.lower() for k, v in vars(Op).items() if not k.startswith("_")}
TARGET_OPCODES = frozenset(v for v in OPCODES if v >= 0x20)


class RejectReason:
    """RFC 7143 §11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


REJECT_REASONS = {v: k.lower() for k, v in vars(RejectReason).items() if not k.startswith("_")}


class LoginStatus:
    """Status-Class << 8 | Status-Detail (RFC 7143 §11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


LOGIN_STATUSES = {v: k.lower() for k, v in vars(LoginStatus).items() if not k.startswith("_")}


class Stage:
    """Login stages, CSG/NSG (RFC 7143 §11.12.3)."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


def encode_lun(lun: int) -> int:
    """The 8-byte LUN field for a single-level LUN (SAM-5 §4.7): peripheral addressing below 256, flat above."""
    if lun < 256:
        return lun << 48
    return (0x4000 | (lun & 0x3FFF)) << 48


def decode_lun(field_value: int) -> int:
    first = field_value >> 48
    return first & 0x3FFF if first & 0xC000 == 0x4000 else first & 0xFF


def text_kv(pairs: Mapping[str, Any]) -> bytes:
    """Text keys (RFC 7143 §6.1): ``key=value`` each followed by NUL. Booleans become Yes/No."""
    out = []
    for k, v in pairs.items():
        if isinstance(v, bool):
            v = "Yes" if v else "No"
        out.append(f"{k}={v}".encode() + b"\0")
    return b"".join(out)


def parse_kv(data: bytes) -> dict[str, str]:
    """Inverse of :func:`text_kv`; later duplicates win, which is what the tests want to see anyway."""
    out: dict[str, str] = {}
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        k, _, v = item.decode("utf-8", "replace").partition("=")
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The layer


def _opcode_fields(opcode: int, immediate: int = 0) -> list[Field[Any, Any]]:
    return [
        BitField("reserved0", 0, 1),
        BitField("immediate", immediate, 1),
        BitEnumField("opcode", opcode, 6, OPCODES),
    ]


def _lengths() -> list[Field[Any, Any]]:
    return [ByteField("total_ahs_length", None), X3BytesField("data_segment_length", None)]


def _tail() -> list[Field[Any, Any]]:
    """What follows the 48 bytes: AHS, header digest, data segment, padding, data digest (RFC 7143 §11.2)."""
    return [
        StrLenField("ahs", b"", length_from=lambda p: (p.total_ahs_length or 0) * 4),
        ConditionalField(XLEIntField("header_digest", None), lambda p: p.header_digest_on),
        StrLenField("data", b"", length_from=lambda p: p.data_segment_length or 0),
        StrLenField("pad", None, length_from=lambda p: pad4(p.data_segment_length or 0)),
        ConditionalField(
            XLEIntField("data_digest", None), lambda p: p.data_digest_on and (p.data_segment_length or 0) > 0
        ),
    ]


class BHS(Packet):
    """Basic Header Segment (RFC 7143 §11.2.1) with the rest of the PDU. Dissecting a ``BHS`` yields the subclass
    for its opcode; building one fills in TotalAHSLength, DataSegmentLength, padding and digests left at None."""

    name = "iSCSI BHS"
    header_digest_on = False
    data_digest_on = False
    fields_desc: ClassVar[list[Field[Any, Any]]] = [
        *_opcode_fields(0),
        XByteField("flags", 0),
        XShortField("opcode_specific0", 0),
        *_lengths(),
        XLongField("lun", 0),
        XIntField("itt", 0),
        StrFixedLenField("opcode_specific1", b"\0" * 28, 28),
        *_tail(),
    ]

    def __init__(
        self,
        _pkt: bytes = b"",
        *args: Any,
        header_digest_on: bool = False,
        data_digest_on: bool = False,
        **kwargs: Any,
    ) -> None:
        # Before super().__init__, because dissection runs there and the ConditionalFields read these.
        object.__setattr__(self, "header_digest_on", header_digest_on)
        object.__setattr__(self, "data_digest_on", data_digest_on)
        super().__init__(_pkt, *args, **kwargs)

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kwargs: Any) -> type[Packet]:
        if _pkt and len(_pkt) >= 1:
            return PDU_CLASSES.get(_pkt[0] & 0x3F, cls)
        return cls

    def _keep_digest_flags(self, other: BHS) -> BHS:
        object.__setattr__(other, "header_digest_on", self.header_digest_on)
        object.__setattr__(other, "data_digest_on", self.data_digest_on)
        return other

    # scapy builds from copies and clones; the digest flags are not fields, so carry them by hand.
    def copy(self) -> BHS:
        return self._keep_digest_flags(super().copy())

    def clone_with(self, payload: Any = None, **kwargs: Any) -> BHS:
        return self._keep_digest_flags(super().clone_with(payload, **kwargs))

    def with_digests(self, header: bool, data: bool) -> BHS:
        """A copy that carries (or omits) CRC32C digests when built."""
        clone = self.copy()
        object.__setattr__(clone, "header_digest_on", header)
        object.__setattr__(clone, "data_digest_on", data)
        return clone

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        hdr = bytearray(pkt[:BHS_LEN])
        ahs = bytes(self.ahs or b"")
        data = bytes(self.data or b"")
        if self.total_ahs_length is None:
            hdr[4] = (len(ahs) // 4) & 0xFF
        if self.data_segment_length is None:
            hdr[5:8] = len(data).to_bytes(3, "big")
        out = bytes(hdr) + ahs
        if self.header_digest_on:
            hd = crc32c(out) if self.header_digest is None else self.header_digest
            out += struct.pack("<I", hd)
        padded = data + (b"\0" * pad4(len(data)) if self.pad is None else bytes(self.pad))
        out += padded
        if self.data_digest_on and data:
            dd = crc32c(padded) if self.data_digest is None else self.data_digest
            out += struct.pack("<I", dd)
        return out + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        # Whatever follows is the next PDU in the stream.
        return s, b""

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return BHS if len(payload) >= BHS_LEN else Raw

    def mysummary(self) -> str:
        return self.sprintf(f"iSCSI {OPCODES.get(self.opcode, hex(self.opcode))} itt=%itt%")

    def header_bytes(self) -> bytes:
        """The 48-byte BHS as built, which is what a Reject must echo back."""
        return bytes(self)[:BHS_LEN]


def _pdu(opcode: int, body: list[Field[Any, Any]], immediate: int = 0) -> list[Field[Any, Any]]:
    """Lay out one PDU type: ``body`` lists the fields of bytes 1-3 then those of bytes 8-47, in wire order; the
    opcode byte, the two length fields and the tail are common to all."""
    head: list[Field[Any, Any]] = []
    bits = 0
    it = iter(body)
    for f in it:
        head.append(f)
        bits += f.size if isinstance(f, BitField) else 8 * f.sz
        if bits >= 24:
            break
    assert bits == 24, f"opcode {opcode:#x}: bytes 1-3 hold {bits} bits"
    return [*_opcode_fields(opcode, immediate), *head, *_lengths(), *it, *_tail()]


class NopOut(BHS):
    """NOP-Out (RFC 7143 §11.18)."""

    name = "iSCSI NOP-Out"
    fields_desc = _pdu(Op.NOP_OUT, [
        FlagsField("flags", 0x80, 8, ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "F"]),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", 0), XIntField("ttt", RESERVED_TAG),
        IntField("cmd_sn", 0), IntField("exp_stat_sn", 0), StrFixedLenField("reserved32", b"\0" * 16, 16),
    ], immediate=1)


class ScsiCommand(BHS):
    """SCSI Command (RFC 7143 §11.3). ``flags``: F R W, ATTR in the low three bits."""

    name = "iSCSI SCSI Command"
    fields_desc = _pdu(Op.SCSI_COMMAND, [
        FlagsField("flags", 0x81, 8, ["a0", "a1", "a2", "r3", "r4", "W", "R", "F"]),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", 0), IntField("expected_data_transfer_length", 0),
        IntField("cmd_sn", 0), IntField("exp_stat_sn", 0), StrFixedLenField("cdb", b"\0" * 16, 16),
    ])


class ScsiResponse(BHS):
    """SCSI Response (RFC 7143 §11.4). ``flags``: o u O U (bidi overflow/underflow, overflow/underflow)."""

    name = "iSCSI SCSI Response"
    fields_desc = _pdu(Op.SCSI_RESPONSE, [
        FlagsField("flags", 0x80, 8, ["r0", "U", "O", "u", "o", "r5", "r6", "F"]),
        XByteField("response", 0), XByteField("status", 0),
        XLongField("reserved8", 0), XIntField("itt", 0), XIntField("snack_tag", 0),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        IntField("exp_data_sn", 0), IntField("bidi_read_residual_count", 0), IntField("residual_count", 0),
    ])

    @property
    def sense(self) -> bytes:
        """Sense data (RFC 7143 §11.4.7.2: two-byte SenseLength, then the sense bytes)."""
        data = bytes(self.data or b"")
        if len(data) < 2:
            return b""
        n = int.from_bytes(data[:2], "big")
        return data[2 : 2 + n]


class TaskMgmtRequest(BHS):
    """Task Management Function Request (RFC 7143 §11.5)."""

    name = "iSCSI Task Mgmt Request"
    fields_desc = _pdu(Op.TASK_MGMT_REQUEST, [
        BitField("flags", 1, 1), BitEnumField("function", 1, 7, {
            1: "abort_task", 2: "abort_task_set", 3: "clear_aca", 4: "clear_task_set", 5: "lun_reset",
            6: "target_warm_reset", 7: "target_cold_reset", 8: "task_reassign"}),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", 0), XIntField("referenced_task_tag", RESERVED_TAG),
        IntField("cmd_sn", 0), IntField("exp_stat_sn", 0), IntField("ref_cmd_sn", 0), IntField("exp_data_sn", 0),
        XLongField("reserved40", 0),
    ], immediate=1)


class TaskMgmtResponse(BHS):
    """Task Management Function Response (RFC 7143 §11.6)."""

    name = "iSCSI Task Mgmt Response"
    fields_desc = _pdu(Op.TASK_MGMT_RESPONSE, [
        XByteField("flags", 0x80), XByteField("response", 0), XByteField("reserved3", 0),
        XLongField("reserved8", 0), XIntField("itt", 0), XIntField("reserved20", 0),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        StrFixedLenField("reserved36", b"\0" * 12, 12),
    ])


class LoginRequest(BHS):
    """Login Request (RFC 7143 §11.12). The I bit is always 1."""

    name = "iSCSI Login Request"
    fields_desc = _pdu(Op.LOGIN_REQUEST, [
        BitField("transit", 1, 1), BitField("continue_", 0, 1), BitField("reserved_tc", 0, 2),
        BitEnumField("csg", 0, 2, {0: "security", 1: "operational", 3: "full_feature"}),
        BitEnumField("nsg", 3, 2, {0: "security", 1: "operational", 3: "full_feature"}),
        ByteField("version_max", 0), ByteField("version_min", 0),
        XBitField("isid", 0x400000000001, 48), XShortField("tsih", 0), XIntField("itt", 0),
        ShortField("cid", 0), XShortField("reserved22", 0),
        IntField("cmd_sn", 0), IntField("exp_stat_sn", 0), StrFixedLenField("reserved32", b"\0" * 16, 16),
    ], immediate=1)


class LoginResponse(BHS):
    """Login Response (RFC 7143 §11.13)."""

    name = "iSCSI Login Response"
    fields_desc = _pdu(Op.LOGIN_RESPONSE, [
        BitField("transit", 0, 1), BitField("continue_", 0, 1), BitField("reserved_tc", 0, 2),
        BitEnumField("csg", 0, 2, {0: "security", 1: "operational", 3: "full_feature"}),
        BitEnumField("nsg", 0, 2, {0: "security", 1: "operational", 3: "full_feature"}),
        ByteField("version_max", 0), ByteField("version_active", 0),
        XBitField("isid", 0, 48), XShortField("tsih", 0), XIntField("itt", 0), XIntField("reserved20", 0),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        ByteField("status_class", 0), ByteField("status_detail", 0), StrFixedLenField("reserved38", b"\0" * 10, 10),
    ])

    @property
    def status(self) -> int:
        return int(self.status_class) << 8 | int(self.status_detail)

    @property
    def keys(self) -> dict[str, str]:
        return parse_kv(self.data or b"")


class TextRequest(BHS):
    """Text Request (RFC 7143 §11.10)."""

    name = "iSCSI Text Request"
    fields_desc = _pdu(Op.TEXT_REQUEST, [
        FlagsField("flags", 0x80, 8, ["r0", "r1", "r2", "r3", "r4", "r5", "C", "F"]),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", 0), XIntField("ttt", RESERVED_TAG),
        IntField("cmd_sn", 0), IntField("exp_stat_sn", 0), StrFixedLenField("reserved32", b"\0" * 16, 16),
    ])


class TextResponse(BHS):
    """Text Response (RFC 7143 §11.11)."""

    name = "iSCSI Text Response"
    fields_desc = _pdu(Op.TEXT_RESPONSE, [
        FlagsField("flags", 0x80, 8, ["r0", "r1", "r2", "r3", "r4", "r5", "C", "F"]),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", 0), XIntField("ttt", RESERVED_TAG),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        StrFixedLenField("reserved36", b"\0" * 12, 12),
    ])


class DataOut(BHS):
    """SCSI Data-Out (RFC 7143 §11.7)."""

    name = "iSCSI Data-Out"
    fields_desc = _pdu(Op.DATA_OUT, [
        FlagsField("flags", 0x80, 8, ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "F"]),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", 0), XIntField("ttt", RESERVED_TAG), XIntField("reserved20", 0),
        IntField("exp_stat_sn", 0), XIntField("reserved28", 0), IntField("data_sn", 0),
        IntField("buffer_offset", 0), XIntField("reserved44", 0),
    ])


class DataIn(BHS):
    """SCSI Data-In (RFC 7143 §11.7). ``flags``: F A . . . O U S."""

    name = "iSCSI Data-In"
    fields_desc = _pdu(Op.DATA_IN, [
        FlagsField("flags", 0x80, 8, ["S", "U", "O", "r3", "r4", "r5", "A", "F"]),
        XByteField("reserved2", 0), XByteField("status", 0),
        XLongField("lun", 0), XIntField("itt", 0), XIntField("ttt", RESERVED_TAG),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        IntField("data_sn", 0), IntField("buffer_offset", 0), IntField("residual_count", 0),
    ])


class LogoutRequest(BHS):
    """Logout Request (RFC 7143 §11.14). Reason 0 closes the session."""

    name = "iSCSI Logout Request"
    fields_desc = _pdu(Op.LOGOUT_REQUEST, [
        BitField("flags", 1, 1), BitEnumField("reason_code", 0, 7, {
            0: "close_session", 1: "close_connection", 2: "remove_connection_for_recovery"}),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("reserved8", 0), XIntField("itt", 0), ShortField("cid", 0), XShortField("reserved22", 0),
        IntField("cmd_sn", 0), IntField("exp_stat_sn", 0), StrFixedLenField("reserved32", b"\0" * 16, 16),
    ], immediate=1)


class LogoutResponse(BHS):
    """Logout Response (RFC 7143 §11.15)."""

    name = "iSCSI Logout Response"
    fields_desc = _pdu(Op.LOGOUT_RESPONSE, [
        XByteField("flags", 0x80), XByteField("response", 0), XByteField("reserved3", 0),
        XLongField("reserved8", 0), XIntField("itt", 0), XIntField("reserved20", 0),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0), XIntField("reserved36", 0),
        ShortField("time2wait", 0), ShortField("time2retain", 0), XIntField("reserved44", 0),
    ])


class SnackRequest(BHS):
    """SNACK Request (RFC 7143 §11.16)."""

    name = "iSCSI SNACK Request"
    fields_desc = _pdu(Op.SNACK_REQUEST, [
        BitField("flags", 1, 1), BitField("reserved_snack", 0, 3),
        BitEnumField("type", 0, 4, {0: "data_r2t", 1: "status", 2: "data_ack", 3: "r_data"}),
        XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", RESERVED_TAG), XIntField("ttt", RESERVED_TAG),
        XIntField("reserved24", 0), IntField("exp_stat_sn", 0), XLongField("reserved32", 0),
        IntField("beg_run", 0), IntField("run_length", 0),
    ])


class R2T(BHS):
    """Ready To Transfer (RFC 7143 §11.8)."""

    name = "iSCSI R2T"
    fields_desc = _pdu(Op.R2T, [
        XByteField("flags", 0x80), XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", 0), XIntField("ttt", 0),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        IntField("r2t_sn", 0), IntField("buffer_offset", 0), IntField("desired_data_transfer_length", 0),
    ])


class AsyncMessage(BHS):
    """Asynchronous Message (RFC 7143 §11.9)."""

    name = "iSCSI Async Message"
    fields_desc = _pdu(Op.ASYNC_MESSAGE, [
        XByteField("flags", 0x80), XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", RESERVED_TAG), XIntField("reserved20", 0),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        ByteEnumField("async_event", 0, {
            0: "scsi_event", 1: "logout_request", 2: "drop_connection", 3: "drop_all_connections",
            4: "negotiation_request", 5: "task_termination", 255: "vendor_specific"}),
        XByteField("async_vcode", 0), ShortField("parameter1", 0), ShortField("parameter2", 0),
        ShortField("parameter3", 0), XIntField("reserved44", 0),
    ])


class Reject(BHS):
    """Reject (RFC 7143 §11.17). The data segment is the complete header of the rejected PDU."""

    name = "iSCSI Reject"
    fields_desc = _pdu(Op.REJECT, [
        XByteField("flags", 0x80), ByteEnumField("reason", 0, REJECT_REASONS), XByteField("reserved3", 0),
        XLongField("reserved8", 0), XIntField("itt", RESERVED_TAG), XIntField("reserved20", 0),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        IntField("data_sn_r2t_sn", 0), XLongField("reserved40", 0),
    ])

    @property
    def rejected_header(self) -> bytes:
        return bytes(self.data or b"")[:BHS_LEN]


class NopIn(BHS):
    """NOP-In (RFC 7143 §11.19)."""

    name = "iSCSI NOP-In"
    fields_desc = _pdu(Op.NOP_IN, [
        XByteField("flags", 0x80), XByteField("reserved2", 0), XByteField("reserved3", 0),
        XLongField("lun", 0), XIntField("itt", RESERVED_TAG), XIntField("ttt", RESERVED_TAG),
        IntField("stat_sn", 0), IntField("exp_cmd_sn", 0), IntField("max_cmd_sn", 0),
        StrFixedLenField("reserved36", b"\0" * 12, 12),
    ])


PDU_CLASSES: dict[int, type[BHS]] = {
    Op.NOP_OUT: NopOut, Op.SCSI_COMMAND: ScsiCommand, Op.TASK_MGMT_REQUEST: TaskMgmtRequest,
    Op.LOGIN_REQUEST: LoginRequest, Op.TEXT_REQUEST: TextRequest, Op.DATA_OUT: DataOut,
    Op.LOGOUT_REQUEST: LogoutRequest, Op.SNACK_REQUEST: SnackRequest, Op.NOP_IN: NopIn,
    Op.SCSI_RESPONSE: ScsiResponse, Op.TASK_MGMT_RESPONSE: TaskMgmtResponse, Op.LOGIN_RESPONSE: LoginResponse,
    Op.TEXT_RESPONSE: TextResponse, Op.DATA_IN: DataIn, Op.LOGOUT_RESPONSE: LogoutResponse, Op.R2T: R2T,
    Op.ASYNC_MESSAGE: AsyncMessage, Op.REJECT: Reject,
}

bind_layers(TCP, BHS, dport=ISCSI_PORT)
bind_layers(TCP, BHS, sport=ISCSI_PORT)

for _cls in PDU_CLASSES.values():
    assert len(bytes(_cls())) == BHS_LEN, _cls.__name__


# ---------------------------------------------------------------------------------------------------------------------
# Builders

DEFAULT_INITIATOR = "iqn.2026-11.io.lunsync:test-initiator"
DEFAULT_ISID = 0x400000000001  # "Random" format (RFC 7143 §11.12.5, T=01b would be EN; 0x40 is T=01b, fine for tests)

OPERATIONAL_DEFAULTS: dict[str, Any] = {
    "HeaderDigest": "None",
    "DataDigest": "None",
    "MaxRecvDataSegmentLength": 262144,
    "InitialR2T": True,
    "ImmediateData": True,
    "MaxBurstLength": 262144,
    "FirstBurstLength": 65536,
    "DefaultTime2Wait": 0,
    "DefaultTime2Retain": 0,
    "MaxOutstandingR2T": 1,
    "DataPDUInOrder": True,
    "DataSequenceInOrder": True,
    "ErrorRecoveryLevel": 0,
    "MaxConnections": 1,
}


def login_request(
    initiator: str = DEFAULT_INITIATOR,
    target: str | None = None,
    isid: int = DEFAULT_ISID,
    *,
    tsih: int = 0,
    itt: int = 0,
    cid: int = 0,
    cmd_sn: int = 1,
    exp_stat_sn: int = 0,
    session_type: str = "Normal",
    extra: Mapping[str, Any] | None = None,
    operational: bool = True,
    csg: int = Stage.SECURITY,
    nsg: int = Stage.FULL_FEATURE,
    transit: bool = True,
) -> LoginRequest:
    """A single Login Request that asks to go straight from the security stage to full feature phase with
    AuthMethod=None (RFC 7143 §6.3) and, unless ``operational`` is False, the usual operational keys."""
    keys: dict[str, Any] = {"InitiatorName": initiator, "SessionType": session_type}
    if target is not None and session_type == "Normal":
        keys["TargetName"] = target
    if csg == Stage.SECURITY:
        keys["AuthMethod"] = "None"
    if operational:
        keys.update(OPERATIONAL_DEFAULTS)
    if extra:
        keys.update(extra)
    return LoginRequest(
        transit=int(transit), csg=csg, nsg=nsg, isid=isid, tsih=tsih, itt=itt, cid=cid, cmd_sn=cmd_sn,
        exp_stat_sn=exp_stat_sn, data=text_kv(keys),
    )


def cdb_test_unit_ready() -> bytes:
    return bytes(6)


def cdb_read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def cdb_write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0)


def cdb_read_capacity10() -> bytes:
    return bytes([0x25]) + bytes(9)


def cdb_inquiry(alloc: int = 96, evpd: int = 0, page: int = 0) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def split_pdus(stream: bytes, header_digest_on: bool = False, data_digest_on: bool = False) -> list[BHS]:
    """Cut a byte stream into PDUs, framing by each header's lengths."""
    out: list[BHS] = []
    i = 0
    while len(stream) - i >= BHS_LEN:
        n = pdu_length(stream[i : i + BHS_LEN], header_digest_on, data_digest_on)
        if len(stream) - i < n:
            break
        out.append(BHS(stream[i : i + n], header_digest_on=header_digest_on, data_digest_on=data_digest_on))
        i += n
    return out


def pdu_length(header: bytes, header_digest_on: bool = False, data_digest_on: bool = False) -> int:
    ahs = header[4] * 4
    dsl = int.from_bytes(header[5:8], "big")
    n = BHS_LEN + ahs + (4 if header_digest_on else 0) + dsl + pad4(dsl)
    if dsl and data_digest_on:
        n += 4
    return n


# ---------------------------------------------------------------------------------------------------------------------
# RawInitiator


class ConnectionClosed(Exception):
    """The target closed (or reset) the connection."""


class ProtocolViolation(AssertionError):
    """The target answered with something a correct target would not send."""


@dataclass
class ScsiResult:
    status: int
    data: bytes
    sense: bytes
    response: ScsiResponse | DataIn
    residual: int = 0
    pdus: list[BHS] = field(default_factory=list)

    @property
    def sense_key(self) -> int | None:
        if len(self.sense) < 3:
            return None
        if self.sense[0] & 0x7F in (0x72, 0x73):
            return self.sense[1] & 0x0F
        return self.sense[2] & 0x0F


class RawInitiator:
    """One iSCSI connection driven by hand. Sequence numbers are tracked for the happy path only; anything sent with
    :meth:`send` goes out exactly as given."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, source: str | None = None) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.source = source  # a local address to connect from (any 127.0.0.0/8 address works on loopback)
        self.sock: socket.socket | None = None
        self._buf = bytearray()
        self.itt = 0x1000
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        self.exp_cmd_sn = 1
        self.max_cmd_sn = 1
        self.tsih = 0
        self.isid = DEFAULT_ISID
        self.header_digest_on = False
        self.data_digest_on = False
        self.negotiated: dict[str, str] = {}
        self.target_keys: dict[str, str] = {}
        self.received: list[BHS] = []

    # -- plumbing ----------------------------------------------------------------------------------------------------

    def connect(self) -> RawInitiator:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout,
                                             source_address=(self.source, 0) if self.source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def __enter__(self) -> Self:
        if self.sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def next_itt(self) -> int:
        self.itt = (self.itt + 1) & 0xFFFFFFFF
        if self.itt == RESERVED_TAG:
            self.itt = 1
        return self.itt

    def send(self, what: Packet | bytes | Iterable[Packet | bytes]) -> None:
        assert self.sock is not None, "not connected"
        if isinstance(what, (bytes, bytearray, memoryview)):
            payload = bytes(what)
        elif isinstance(what, Packet):
            payload = bytes(self._with_digests(what))
        else:
            payload = b"".join(bytes(w) if isinstance(w, (bytes, bytearray)) else bytes(self._with_digests(w))
                               for w in what)
        self.sock.sendall(payload)

    def _with_digests(self, pkt: Packet) -> Packet:
        if isinstance(pkt, BHS) and (self.header_digest_on or self.data_digest_on):
            return pkt.with_digests(self.header_digest_on, self.data_digest_on)
        return pkt

    def _fill(self, n: int, deadline: float) -> None:
        assert self.sock is not None, "not connected"
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {n - len(self._buf)} more bytes")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            try:
                chunk = self.sock.recv(max(65536, n - len(self._buf)))
            except ConnectionResetError as e:
                raise ConnectionClosed("connection reset by target") from e
            if not chunk:
                raise ConnectionClosed(f"target closed the connection ({len(self._buf)} bytes left unparsed)")
            self._buf += chunk

    def recv_pdu(self, timeout: float | None = None) -> BHS:
        """The next PDU. Raises :class:`TimeoutError` or :class:`ConnectionClosed`; a PDU whose opcode is not a target
        opcode, or whose header digest is wrong, raises :class:`ProtocolViolation`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(BHS_LEN, deadline)
        opcode = self._buf[0] & 0x3F
        if opcode not in TARGET_OPCODES:
            raise ProtocolViolation(f"target sent initiator/unknown opcode 0x{opcode:02x}: {bytes(self._buf[:48]).hex()}")
        n = pdu_length(self._buf[:BHS_LEN], self.header_digest_on, self.data_digest_on)
        self._fill(n, deadline)
        raw = bytes(self._buf[:n])
        del self._buf[:n]
        pdu = BHS(raw, header_digest_on=self.header_digest_on, data_digest_on=self.data_digest_on)
        if self.header_digest_on:
            hlen = BHS_LEN + raw[4] * 4
            if crc32c(raw[:hlen]) != pdu.header_digest:
                raise ProtocolViolation("bad header digest from target")
        self.received.append(pdu)
        return pdu

    def expect_closed(self, timeout: float = 5.0) -> list[BHS]:
        """Wait for the target to close the connection; returns whatever PDUs came first."""
        got: list[BHS] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                got.append(self.recv_pdu(timeout=max(0.0, deadline - time.monotonic())))
            except ConnectionClosed:
                return got
            except TimeoutError:
                raise AssertionError(f"target kept the connection open for {timeout}s; got {summaries(got)}")

    def is_closed(self, timeout: float = 0.5) -> bool:
        """True if the target has closed the connection (pending PDUs are drained and kept in ``received``)."""
        try:
            while True:
                self.recv_pdu(timeout=timeout)
        except ConnectionClosed:
            return True
        except TimeoutError:
            return False

    def drain(self, timeout: float = 0.5) -> list[BHS]:
        """Every PDU that arrives within ``timeout`` of the previous one; stops quietly on close."""
        got: list[BHS] = []
        try:
            while True:
                got.append(self.recv_pdu(timeout=timeout))
        except (TimeoutError, ConnectionClosed):
            return got

    # -- login / logout ----------------------------------------------------------------------------------------------

    def login(
        self,
        target: str | None,
        initiator: str = DEFAULT_INITIATOR,
        *,
        isid: int | None = None,
        extra: Mapping[str, Any] | None = None,
        session_type: str = "Normal",
        check: bool = True,
    ) -> LoginResponse:
        """A normal login with AuthMethod=None, straight to full feature phase when the target allows it, otherwise
        through the operational stage. Returns the last Login Response; with ``check``, asserts success."""
        if self.sock is None:
            self.connect()
        self.isid = isid if isid is not None else self.isid
        itt = self.next_itt()
        req = login_request(initiator, target, self.isid, itt=itt, cmd_sn=self.cmd_sn,
                            exp_stat_sn=self.exp_stat_sn, session_type=session_type, extra=extra)
        offered = parse_kv(req.data)
        answered: dict[str, str] = {}
        for _ in range(4):
            self.send(req)
            rsp = self.recv_pdu()
            if not isinstance(rsp, LoginResponse):
                raise ProtocolViolation(f"expected a Login Response, got {rsp.summary()}")
            if rsp.status_class != 0:
                if check:
                    raise AssertionError(f"login failed: status 0x{rsp.status:04x} "
                                         f"({LOGIN_STATUSES.get(rsp.status, '?')})")
                return rsp
            # A target may refuse operational keys in the security stage (tgt answers NotUnderstood); they are
            # offered again in the operational stage below.
            answered.update({k: v for k, v in rsp.keys.items() if v not in ("NotUnderstood", "Irrelevant", "Reject")})
            self.exp_stat_sn = rsp.stat_sn + 1
            self.exp_cmd_sn, self.max_cmd_sn = rsp.exp_cmd_sn, rsp.max_cmd_sn
            self.tsih = rsp.tsih
            if rsp.transit and rsp.nsg == Stage.FULL_FEATURE:
                break
            # The target wants another round: move on through the operational stage.
            csg = Stage.OPERATIONAL if rsp.transit else rsp.csg
            req = LoginRequest(transit=1, csg=csg, nsg=Stage.FULL_FEATURE, isid=self.isid, tsih=self.tsih, itt=itt,
                               cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn,
                               data=b"" if csg == Stage.SECURITY else text_kv(
                                   {k: v for k, v in OPERATIONAL_DEFAULTS.items() if k not in answered}))
        else:
            raise AssertionError("login did not reach full feature phase in 4 rounds")
        self.negotiated = {**{k: str(v) for k, v in offered.items()}, **answered}
        self.target_keys = answered
        # Digests start with the first PDU after the final Login Response (RFC 7143 §13.1).
        self.header_digest_on = answered.get("HeaderDigest") == "CRC32C"
        self.data_digest_on = answered.get("DataDigest") == "CRC32C"
        return rsp

    def param(self, key: str, default: str) -> str:
        return self.negotiated.get(key, default)

    @property
    def target_mrdsl(self) -> int:
        """The target's MaxRecvDataSegmentLength, declared in its login keys (RFC 7143 §13.12; default 8192)."""
        return int(self.target_keys.get("MaxRecvDataSegmentLength", 8192))

    def logout(self) -> LogoutResponse:
        itt = self.next_itt()
        self.send(LogoutRequest(immediate=1, reason_code=0, itt=itt, cmd_sn=self.cmd_sn,
                                exp_stat_sn=self.exp_stat_sn))
        rsp = self._wait_for(itt)
        if not isinstance(rsp, LogoutResponse):
            raise ProtocolViolation(f"expected a Logout Response, got {rsp.summary()}")
        return rsp

    # -- commands ----------------------------------------------------------------------------------------------------

    def _wait_for(self, itt: int, timeout: float | None = None) -> BHS:
        """PDUs until one carries ``itt``; answers target NOP-In pings on the way."""
        while True:
            pdu = self.recv_pdu(timeout)
            if isinstance(pdu, NopIn) and pdu.itt == RESERVED_TAG:
                if pdu.ttt != RESERVED_TAG:
                    self.send(NopOut(immediate=1, itt=RESERVED_TAG, ttt=pdu.ttt, lun=pdu.lun, cmd_sn=self.cmd_sn,
                                     exp_stat_sn=self.exp_stat_sn))
                continue
            if isinstance(pdu, AsyncMessage):
                continue
            if isinstance(pdu, Reject):
                raise ProtocolViolation(f"Reject reason 0x{pdu.reason:02x} for header {pdu.rejected_header.hex()}")
            if pdu.itt == itt:
                return pdu
            raise ProtocolViolation(f"PDU for unknown ITT: {pdu.summary()}")

    def nop(self, data: bytes = b"", timeout: float | None = None) -> NopIn:
        """A ping (NOP-Out with a valid ITT, immediate); the target must echo ``data`` (RFC 7143 §11.18)."""
        itt = self.next_itt()
        self.send(NopOut(immediate=1, itt=itt, ttt=RESERVED_TAG, cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn,
                         data=data))
        rsp = self._wait_for(itt, timeout)
        if not isinstance(rsp, NopIn):
            raise ProtocolViolation(f"expected NOP-In, got {rsp.summary()}")
        self.exp_stat_sn = max(self.exp_stat_sn, rsp.stat_sn + 1)
        self.exp_cmd_sn, self.max_cmd_sn = rsp.exp_cmd_sn, rsp.max_cmd_sn
        return rsp

    def scsi(
        self,
        cdb: bytes,
        *,
        lun: int = 0,
        read_length: int = 0,
        write_data: bytes | None = None,
        timeout: float | None = None,
    ) -> ScsiResult:
        """Send one SCSI command and gather its Data-In / answer its R2Ts until status arrives."""
        itt = self.next_itt()
        write_data = write_data or b""
        edtl = len(write_data) if write_data else read_length
        flags = 0x80 | 0x01  # F, ATTR=SIMPLE
        if read_length:
            flags |= 0x40
        if write_data:
            flags |= 0x20
        immediate = b""
        if write_data and self.param("ImmediateData", "Yes") == "Yes":
            first = int(self.param("FirstBurstLength", "65536"))
            immediate = write_data[: min(first, self.target_mrdsl)]
        cmd = ScsiCommand(flags=flags, lun=encode_lun(lun), itt=itt, expected_data_transfer_length=edtl,
                          cmd_sn=self.cmd_sn, exp_stat_sn=self.exp_stat_sn, cdb=cdb.ljust(16, b"\0"),
                          data=immediate)
        self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        self.send(cmd)
        sent = len(immediate)
        if write_data and sent < len(write_data) and self.param("InitialR2T", "Yes") == "No":
            raise NotImplementedError("unsolicited Data-Out is not implemented")
        buf = bytearray(read_length)
        pdus: list[BHS] = []
        while True:
            pdu = self._wait_for(itt, timeout)
            pdus.append(pdu)
            if isinstance(pdu, DataIn):
                off = pdu.buffer_offset
                chunk = bytes(pdu.data or b"")
                if off + len(chunk) > read_length:
                    raise ProtocolViolation(f"Data-In beyond the expected length: offset {off} + {len(chunk)}")
                buf[off : off + len(chunk)] = chunk
                self.exp_cmd_sn, self.max_cmd_sn = pdu.exp_cmd_sn, pdu.max_cmd_sn
                if pdu.flags & 0x01:  # S: status in the last Data-In
                    self.exp_stat_sn = pdu.stat_sn + 1
                    return ScsiResult(pdu.status, bytes(buf[: read_length - pdu.residual_count if pdu.flags & 0x02
                                                            else read_length]), b"", pdu, pdu.residual_count, pdus)
            elif isinstance(pdu, R2T):
                self._answer_r2t(pdu, write_data)
            elif isinstance(pdu, ScsiResponse):
                self.exp_stat_sn = pdu.stat_sn + 1
                self.exp_cmd_sn, self.max_cmd_sn = pdu.exp_cmd_sn, pdu.max_cmd_sn
                n = read_length - pdu.residual_count if pdu.flags & 0x02 else read_length
                return ScsiResult(pdu.status, bytes(buf[:n]), pdu.sense, pdu, pdu.residual_count, pdus)
            else:
                raise ProtocolViolation(f"unexpected PDU during a command: {pdu.summary()}")

    def _answer_r2t(self, r2t: R2T, data: bytes) -> None:
        off, want = r2t.buffer_offset, r2t.desired_data_transfer_length
        if off + want > len(data):
            raise ProtocolViolation(f"R2T asks for {want} bytes at {off}, beyond {len(data)}")
        step = self.target_mrdsl
        pdus = []
        for i, pos in enumerate(range(off, off + want, step)):
            chunk = data[pos : min(pos + step, off + want)]
            last = pos + step >= off + want
            pdus.append(DataOut(flags=0x80 if last else 0, lun=r2t.lun, itt=r2t.itt, ttt=r2t.ttt,
                                exp_stat_sn=self.exp_stat_sn, data_sn=i, buffer_offset=pos, data=chunk))
        self.send(pdus)

    def test_unit_ready(self, lun: int = 0) -> ScsiResult:
        return self.scsi(cdb_test_unit_ready(), lun=lun)

    def read_capacity(self, lun: int = 0) -> tuple[int, int]:
        """(number of blocks, block size) from READ CAPACITY(10)."""
        r = self.scsi(cdb_read_capacity10(), lun=lun, read_length=8)
        assert r.status == 0, f"READ CAPACITY failed: status 0x{r.status:02x} sense {r.sense.hex()}"
        last, bs = struct.unpack(">II", r.data)
        return last + 1, bs

    def read10(self, lba: int, blocks: int, block_size: int = 512, lun: int = 0) -> ScsiResult:
        return self.scsi(cdb_read10(lba, blocks), lun=lun, read_length=blocks * block_size)

    def write10(self, lba: int, data: bytes, block_size: int = 512, lun: int = 0) -> ScsiResult:
        assert len(data) % block_size == 0
        return self.scsi(cdb_write10(lba, len(data) // block_size), lun=lun, write_data=data)


def summaries(pdus: Iterable[BHS]) -> list[str]:
    out = []
    for p in pdus:
        s = p.summary()
        if isinstance(p, Reject):
            s += f" reason=0x{p.reason:02x}"
        if isinstance(p, LoginResponse):
            s += f" status=0x{p.status:04x}"
        out.append(s)
    return out


def random_bytes(n: int, seed: int | None = None) -> bytes:
    if seed is None:
        return os.urandom(n)
    import random

    return random.Random(seed).randbytes(n)

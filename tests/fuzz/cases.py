"""What the fuzzer sends: every input as plain bytes plus the phase it is sent in, drawn from hypothesis strategies.

This module owns the input space of :mod:`fuzz.run` and nothing else: it does no I/O. A :class:`Case` says which
connection state the bytes go to (a fresh connection before login, a logged-in session with or without CRC32C
digests, or a SCSI command on the fuzz LUN) and how they are cut into writes. The families are the ones issue 7 names:
scapy ``fuzz()`` of every PDU type, lying lengths, bad digests, out-of-window CmdSN, wrong opcodes per phase,
truncated and oversized segments, logins split at every byte, and CDBs of every opcode the daemon reports. Byte
building happens here, in the one thread hypothesis runs in, because scapy's ``fuzz()`` draws from the global
``random`` module.
"""

from __future__ import annotations

import enum
import random
import struct
from dataclasses import dataclass

from hypothesis import strategies as st
from iscsi_scapy import (
    BHS,
    BHS_LEN,
    PDU_CLASSES,
    RESERVED_TAG,
    DataOut,
    LoginRequest,
    LogoutRequest,
    NopOut,
    Op,
    ScsiCommand,
    SnackRequest,
    TaskMgmtRequest,
    TextRequest,
    crc32c,
    login_request,
    text_kv,
)
from scapy.packet import fuzz

FUZZ_INITIATOR = "iqn.2026-11.io.lunsync:fuzzer"
# The target's declared MaxRecvDataSegmentLength is at most this; "oversized" segments go beyond it.
MAX_SEGMENT = 262144


class Phase(enum.Enum):
    LOGIN = "login"  # a fresh connection, nothing sent yet
    SPLIT_LOGIN = "split-login"  # a valid login, cut into writes; it must succeed
    FFP = "ffp"  # a logged-in session without digests
    DIGEST = "digest"  # a logged-in session with HeaderDigest=DataDigest=CRC32C
    CDB = "cdb"  # one SCSI command on the fuzz LUN through the lenient command loop


@dataclass(frozen=True, slots=True)
class Case:
    family: str
    phase: Phase
    chunks: tuple[bytes, ...] = ()  # written in order, each with its own send
    # CDB cases only
    cdb: bytes = b""
    direction: int = 0  # 0 none, 1 in, 2 out
    edtl: int = 0
    data_out: bytes = b""


@dataclass(frozen=True, slots=True)
class OpInfo:
    """One supported command as REPORT SUPPORTED OPERATION CODES describes it."""

    opcode: int
    service_action: int | None
    cdb_len: int
    direction: int


INITIATOR_PDUS = (NopOut, ScsiCommand, TaskMgmtRequest, LoginRequest, TextRequest, DataOut, LogoutRequest,
                  SnackRequest)
ALL_PDUS = tuple(PDU_CLASSES.values())


def _scapy_fuzz(cls_index: int, seed: int) -> bytes:
    random.seed(seed)
    return bytes(fuzz(ALL_PDUS[cls_index]()))


@st.composite
def scapy_cases(draw: st.DrawFn) -> Case:
    """scapy's fuzz() of one PDU type (initiator and target opcodes alike), in either phase."""
    idx = draw(st.integers(0, len(ALL_PDUS) - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    phase = draw(st.sampled_from([Phase.FFP, Phase.FFP, Phase.FFP, Phase.LOGIN]))
    return Case(f"scapy-{ALL_PDUS[idx].__name__}", phase, (_scapy_fuzz(idx, seed),))


def _benign_pdu(draw: st.DrawFn, data: bytes = b"") -> BHS:
    """A PDU a logged-in session may send, as a base for one lie."""
    kind = draw(st.sampled_from(["nop", "tur", "write", "text", "dataout"]))
    if kind == "nop":
        return NopOut(immediate=1, itt=draw(st.integers(1, 0xFFFF)), ttt=RESERVED_TAG, data=data)
    if kind == "tur":
        return ScsiCommand(flags=0x81, itt=draw(st.integers(1, 0xFFFF)), cmd_sn=0, cdb=bytes(16), data=data)
    if kind == "write":
        blocks = max(1, len(data) // 512)
        cdb = struct.pack(">BBIBHB", 0x2A, 0, draw(st.integers(0, 1000)), 0, blocks, 0).ljust(16, b"\0")
        return ScsiCommand(flags=0xA1, itt=draw(st.integers(1, 0xFFFF)), expected_data_transfer_length=blocks * 512,
                           cdb=cdb, data=data)
    if kind == "text":
        return TextRequest(itt=draw(st.integers(1, 0xFFFF)), data=data or text_kv({"SendTargets": "All"}))
    return DataOut(flags=0x80, itt=draw(st.integers(1, 0xFFFF)), ttt=draw(st.integers(0, 0xFFFFFFFF)), data=data)


@st.composite
def lying_length_cases(draw: st.DrawFn) -> Case:
    """TotalAHSLength or DataSegmentLength that does not match what follows, or padding that lies."""
    data = draw(st.binary(max_size=600))
    pdu = _benign_pdu(draw, data)
    raw = bytearray(bytes(pdu))
    which = draw(st.sampled_from(["dsl", "ahs", "both", "pad"]))
    if which in ("dsl", "both"):
        raw[5:8] = draw(st.sampled_from([0, 1, 3, len(data) + 1, len(data) + 4, 0xFFFFFF,
                                         draw(st.integers(0, 0xFFFFFF))])).to_bytes(3, "big")
    if which in ("ahs", "both"):
        raw[4] = draw(st.integers(1, 255))
    if which == "pad":
        raw += draw(st.binary(min_size=1, max_size=3))
    return Case(f"lying-{which}", draw(st.sampled_from([Phase.FFP, Phase.FFP, Phase.LOGIN])), (bytes(raw),))


@st.composite
def bad_digest_cases(draw: st.DrawFn) -> Case:
    """A PDU with correct framing and a wrong header or data CRC32C, on a session that negotiated both."""
    data = draw(st.binary(min_size=1, max_size=4096))
    pdu = _benign_pdu(draw, data).with_digests(True, True)
    raw = bytearray(bytes(pdu))
    hdr_end = BHS_LEN + 4
    which = draw(st.sampled_from(["header", "data", "both", "none-missing"]))
    if which in ("header", "both"):
        raw[BHS_LEN : hdr_end] = struct.pack("<I", crc32c(bytes(raw[:BHS_LEN])) ^ draw(st.integers(1, 0xFFFFFFFF)))
    if which in ("data", "both"):
        raw[-4:] = struct.pack("<I", int.from_bytes(raw[-4:], "little") ^ draw(st.integers(1, 0xFFFFFFFF)))
    if which == "none-missing":  # a digest-less PDU on a digest session: framing is off by four bytes
        raw = bytearray(bytes(pdu.with_digests(False, False)))
    return Case(f"digest-{which}", Phase.DIGEST, (bytes(raw),))


@st.composite
def cmd_sn_cases(draw: st.DrawFn) -> Case:
    """Non-immediate commands whose CmdSN lies outside [ExpCmdSN, MaxCmdSN] (RFC 7143 §4.2.2.1: ignore them)."""
    cmds = []
    for _ in range(draw(st.integers(1, 8))):
        sn = draw(st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])))
        cmds.append(bytes(ScsiCommand(flags=0x81, itt=draw(st.integers(1, 0xFFFF)), cmd_sn=sn, cdb=bytes(16))))
    return Case("cmdsn-window", Phase.FFP, (b"".join(cmds),))


_LOGIN_WRONG = (Op.NOP_OUT, Op.SCSI_COMMAND, Op.TASK_MGMT_REQUEST, Op.TEXT_REQUEST, Op.DATA_OUT, Op.LOGOUT_REQUEST,
                Op.SNACK_REQUEST, 0x07, 0x1C, 0x1F)
_FFP_WRONG = (Op.LOGIN_REQUEST, *sorted(o for o in PDU_CLASSES if o >= 0x20), 0x07, 0x0F, 0x1E, 0x1F, 0x3E)


@st.composite
def wrong_opcode_cases(draw: st.DrawFn) -> Case:
    """An opcode the phase does not allow: anything but Login before login, Login or a target opcode after."""
    if draw(st.booleans()):
        op = draw(st.sampled_from(_LOGIN_WRONG))
        phase = Phase.LOGIN
    else:
        op = draw(st.sampled_from(_FFP_WRONG))
        phase = Phase.FFP
    cls = PDU_CLASSES.get(op, BHS)
    pdu = cls(itt=draw(st.integers(0, 0xFFFF)), data=draw(st.binary(max_size=64)))
    raw = bytearray(bytes(pdu))
    raw[0] = (raw[0] & 0x40) | op
    return Case(f"wrong-opcode-{phase.value}-{op:#04x}", phase, (bytes(raw),))


@st.composite
def segment_cases(draw: st.DrawFn) -> Case:
    """Truncated segments (the connection then carries on with other bytes) and segments beyond MRDSL."""
    if draw(st.booleans()):
        size = draw(st.sampled_from([MAX_SEGMENT + 4, MAX_SEGMENT * 2, 1 << 20]))
        pdu = _benign_pdu(draw, bytes(size))
        return Case("oversized-segment", Phase.FFP, (bytes(pdu),))
    data = draw(st.binary(min_size=8, max_size=2048))
    raw = bytes(_benign_pdu(draw, data))
    cut = draw(st.integers(1, len(raw) - 1))
    tail = bytes(NopOut(immediate=1, itt=draw(st.integers(1, 0xFFFF)), ttt=RESERVED_TAG))
    return Case("truncated-segment", Phase.FFP, (raw[:cut], tail))


@st.composite
def split_login_cases(draw: st.DrawFn) -> Case:
    """A valid one-PDU login cut at one byte position, or into single bytes; the target must log it in."""
    req = login_request(FUZZ_INITIATOR, "iqn.2026-11.io.lunsync:fuzz", draw(st.integers(0x400000E00000,
                                                                                         0x400000EFFFFF)))
    raw = bytes(req)
    if draw(st.integers(0, 9)) == 0:
        return Case("split-login-every-byte", Phase.SPLIT_LOGIN, tuple(raw[i : i + 1] for i in range(len(raw))))
    cut = draw(st.integers(1, len(raw) - 1))
    return Case("split-login-at-byte", Phase.SPLIT_LOGIN, (raw[:cut], raw[cut:]))


_INTERESTING_BYTES = st.sampled_from([0x00, 0x01, 0x02, 0x07, 0x08, 0x10, 0x1F, 0x20, 0x40, 0x7F, 0x80, 0xFE, 0xFF])


def cdb_cases(ops: list[OpInfo]) -> st.SearchStrategy[Case]:
    """Every supported opcode with the rest of the CDB drawn byte by byte (biased to boundary values), and a
    transfer length that may disagree with the CDB."""

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        op = draw(st.sampled_from(ops))
        body = [draw(st.one_of(_INTERESTING_BYTES, st.integers(0, 255))) for _ in range(op.cdb_len - 1)]
        cdb = bytearray([op.opcode, *body])
        if op.service_action is not None:
            cdb[1] = (cdb[1] & 0xE0) | op.service_action
        edtl = draw(st.sampled_from([0, 8, 512, 4096, draw(st.integers(0, 65536))]))
        direction = op.direction
        data = b""
        if direction == 2:
            data = draw(st.binary(min_size=min(edtl, 64), max_size=min(edtl, 64))) + bytes(max(0, edtl - 64))
        return Case(f"cdb-{op.opcode:#04x}" + (f"/{op.service_action}" if op.service_action is not None else ""),
                    Phase.CDB, cdb=bytes(cdb).ljust(16, b"\0"), direction=direction, edtl=edtl, data_out=data)

    return build()


def all_cases(ops: list[OpInfo]) -> st.SearchStrategy[Case]:
    """The whole input space; weights favour the cheap full-feature families (a fresh connection costs a login)."""
    return st.one_of(
        scapy_cases(), scapy_cases(),
        lying_length_cases(), bad_digest_cases(), cmd_sn_cases(), wrong_opcode_cases(), segment_cases(),
        split_login_cases(),
        cdb_cases(ops), cdb_cases(ops), cdb_cases(ops),
    )


def nop_probe(itt: int) -> bytes:
    """An immediate ping; its echo proves the connection still parses PDUs after the fuzzed input."""
    return bytes(NopOut(immediate=1, itt=itt, ttt=RESERVED_TAG, data=b"probe"))


def digest_probe(itt: int) -> bytes:
    return bytes(NopOut(immediate=1, itt=itt, ttt=RESERVED_TAG, data=b"probe").with_digests(True, True))


def parse_rsoc(data: bytes) -> list[OpInfo]:
    """REPORT SUPPORTED OPERATION CODES, reporting options 000b (SPC-4 §6.35.2): 8-byte command descriptors."""
    n = int.from_bytes(data[:4], "big")
    out = []
    for off in range(4, min(4 + n, len(data)) - 7, 8):
        opcode, _, sa, _, flags, cdb_len = struct.unpack(">BBHBBH", data[off : off + 8])
        out.append(OpInfo(opcode, sa if flags & 0x01 else None, cdb_len, 0))
    return out


"""Unit tests for lunsync.target.scsi.xcopy: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS."""

from __future__ import annotations

import struct

from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.task import Status

from tests.target.scsi.memdev import IDENTITY, IDENTITY2, NEXUS_A, NEXUS_B, MemDevice, Session, make_target, sense_of


def cscd(naa: bytes, nul: bool = False, code: int = 0xE4) -> bytes:
    d = bytearray(32)
    d[0] = code
    d[1] = 0x20 if nul else 0
    d[4], d[5], d[7] = 0x01, 0x03, len(naa)
    d[8 : 8 + len(naa)] = naa
    d[29:32] = (512).to_bytes(3, "big")
    return bytes(d)


def segment(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, code: int = 0x02) -> bytes:
    return struct.pack(">BBHHH2xHQQ", code, 0, 0x18, src, dst, blocks, src_lba, dst_lba)


def plist(cscds: list[bytes], segs: list[bytes], list_id: int = 1) -> bytes:
    c, s = b"".join(cscds), b"".join(segs)
    return struct.pack(">BBH4xII", list_id, 0, len(c), len(s), 0) + c + s


def xcopy(sess: Session, params: bytes) -> object:
    return sess.cmd(bytes([0x83, 0] + [0] * 8) + len(params).to_bytes(4, "big") + b"\0\0", params)


def rcr(sa: int, list_id: int = 1) -> bytes:
    return bytes([0x84, sa, list_id] + [0] * 7) + (1024).to_bytes(4, "big") + b"\0\0"


def two_luns() -> tuple[Session, MemDevice, MemDevice]:
    t, _, d0 = make_target()
    d1 = MemDevice()
    t.add_lun(1, LogicalUnit(d1, IDENTITY2))
    return Session(t), d0, d1


def test_copy_between_luns_and_status() -> None:
    s, d0, d1 = two_luns()
    d0.data[512 * 10 : 512 * 14] = b"k" * 2048
    r = xcopy(s, plist([cscd(IDENTITY.naa), cscd(IDENTITY2.naa)], [segment(0, 1, 4, 10, 100)]))
    assert r.status == Status.GOOD
    assert bytes(d1.data[512 * 100 : 512 * 104]) == b"k" * 2048
    st = bytes(s.cmd(rcr(0)).data or b"")
    assert struct.unpack(">IBHBI", st) == (8, 0x01, 1, 0x00, 2048)


def test_copy_status_unknown_list_is_invalid_field() -> None:
    s, _, _ = two_luns()
    assert sense_of(s.cmd(rcr(0, 9))) == (5, 0x24, 0x00)


def test_operating_parameters() -> None:
    s, _, _ = two_luns()
    d = bytes(s.cmd(rcr(3)).data or b"")
    assert struct.unpack_from(">HHI", d, 8) == (16, 64, 16 * 32 + 64 * 28)
    assert d[43] == 2 and d[44:46] == b"\x02\xe4"


def test_descriptor_errors() -> None:
    s, _, _ = two_luns()
    naa = IDENTITY.naa
    too_many = plist([cscd(naa)] * 17, [segment(0, 0, 1, 0, 1)])
    assert sense_of(xcopy(s, too_many)) == (5, 0x26, 0x06)  # type: ignore[arg-type]
    segs = plist([cscd(naa)], [segment(0, 0, 1, 0, 1)] * 65)
    assert sense_of(xcopy(s, segs)) == (5, 0x26, 0x08)  # type: ignore[arg-type]
    assert sense_of(xcopy(s, plist([cscd(naa, code=0xE0)], [segment(0, 0, 1, 0, 1)]))) == (5, 0x26, 0x07)  # type: ignore[arg-type]
    assert sense_of(xcopy(s, plist([cscd(naa)], [segment(0, 0, 1, 0, 1, code=0x03)]))) == (5, 0x26, 0x09)  # type: ignore[arg-type]
    assert sense_of(xcopy(s, plist([cscd(naa, nul=True)], [segment(0, 0, 1, 0, 1)]))) == (0xA, 0x0D, 0x02)  # type: ignore[arg-type]
    assert sense_of(xcopy(s, plist([cscd(naa)], [segment(0, 1, 1, 0, 1)]))) == (0xA, 0x08, 0x04)  # type: ignore[arg-type]
    assert sense_of(xcopy(s, plist([cscd(naa)], [segment(0, 0, 8, 0, 4090)])))[0] == 0xA  # type: ignore[arg-type]
    unknown = bytes.fromhex("600140500000000000000000000000ff")
    assert sense_of(xcopy(s, plist([cscd(unknown)], [segment(0, 0, 1, 0, 1)]))) == (0xA, 0x0D, 0x02)  # type: ignore[arg-type]
    full = plist([cscd(naa)], [segment(0, 0, 1, 0, 1)])
    assert sense_of(xcopy(s, full[:-1])) == (5, 0x1A, 0x00)  # type: ignore[arg-type]
    assert xcopy(s, b"").status == Status.GOOD


def test_copy_only_within_the_nexus_view() -> None:
    t, _, _ = make_target()
    other_target, _, _ = make_target(MemDevice())
    other_target.remove_lun(0)
    other_target.add_lun(0, LogicalUnit(MemDevice(), IDENTITY2))
    s = Session(t, NEXUS_A)
    params = plist([cscd(IDENTITY.naa), cscd(IDENTITY2.naa)], [segment(0, 1, 1, 0, 0)])
    assert sense_of(xcopy(s, params)) == (0xA, 0x0D, 0x02)  # type: ignore[arg-type]
    assert Session(t, NEXUS_B).cmd(rcr(0)).status == Status.CHECK_CONDITION

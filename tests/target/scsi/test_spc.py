"""Unit tests for lunsync.target.scsi.spc: INQUIRY/VPD, REPORT LUNS, MODE SENSE/SELECT, LOG SENSE, RSOC."""

from __future__ import annotations

import struct

from lunsync.target.scsi.task import Status

from tests.target.scsi.memdev import IDENTITY, NEXUS_B, MemDevice, Session, cdb10, make_target, sense_of


def data(r: object) -> bytes:
    return bytes(r.data or b"")


def test_standard_inquiry() -> None:
    t, _, _ = make_target()
    d = data(Session(t).cmd(bytes([0x12, 0, 0, 0, 255, 0])))
    assert d[0] == 0x00 and d[2] == 0x06 and d[3] == 0x12 and d[4] == len(d) - 5
    assert d[5] & 0x30 == 0x10 and d[7] & 0x02  # implicit ALUA, CMDQUE
    assert d[8:16] == b"LUNSYNC "


def test_inquiry_allocation_length_truncates() -> None:
    t, _, _ = make_target()
    assert len(data(Session(t).cmd(bytes([0x12, 0, 0, 0, 5, 0])))) == 5


def test_inquiry_bad_fields() -> None:
    s = Session(make_target()[0])
    r = s.cmd(bytes([0x12, 0, 0x80, 0, 255, 0]))  # page code without EVPD
    assert sense_of(r) == (5, 0x24, 0x00) and r.sense is not None and r.sense[16:18] == b"\x00\x02"
    assert sense_of(s.cmd(bytes([0x12, 1, 0xC7, 0, 255, 0]))) == (5, 0x24, 0x00)


def test_vpd_pages() -> None:
    s = Session(make_target()[0])
    supported = data(s.cmd(bytes([0x12, 1, 0, 0, 255, 0])))
    assert list(supported[4:]) == [0x00, 0x80, 0x83, 0x86, 0x8F, 0xB0, 0xB1, 0xB2]
    assert data(s.cmd(bytes([0x12, 1, 0x80, 0, 255, 0])))[4:] == b"LS0001"
    d83 = data(s.cmd(bytes([0x12, 1, 0x83, 0, 255, 0])))
    assert d83[4:8] == bytes((0x01, 0x03, 0x00, 0x10)) and d83[8:24] == IDENTITY.naa
    b0 = data(s.cmd(bytes([0x12, 1, 0xB0, 0, 255, 0])))
    assert struct.unpack_from(">H", b0, 2)[0] == 0x3C
    assert struct.unpack_from(">II", b0, 20) == (1 << 20, 256)  # unmap limits on a thin LUN
    b2 = data(s.cmd(bytes([0x12, 1, 0xB2, 0, 255, 0])))
    assert b2[5] == 0xE4 and b2[6] & 0x07 == 0x02


def test_report_luns() -> None:
    s = Session(make_target()[0])
    d = data(s.cmd(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])))
    assert d == bytes.fromhex("00000008000000000000000000000000")
    assert sense_of(s.cmd(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]))) == (5, 0x24, 0x00)
    assert sense_of(s.cmd(bytes([0xA0, 0, 0x07, 0, 0, 0, 0, 0, 1, 0, 0, 0]))) == (5, 0x24, 0x00)


def test_request_sense_returns_and_clears_ua() -> None:
    s = Session(make_target()[0], clear_ua=False)
    d = data(s.cmd(bytes([0x03, 0, 0, 0, 18, 0])))
    assert (d[2] & 0x0F, d[12], d[13]) == (6, 0x29, 0x00)
    d = data(s.cmd(bytes([0x03, 0, 0, 0, 18, 0])))
    assert (d[2] & 0x0F, d[12], d[13]) == (0, 0, 0)


def test_mode_sense_6_header_and_pages() -> None:
    s = Session(make_target()[0])
    d = data(s.cmd(bytes([0x1A, 0, 0x3F, 0, 255, 0])))
    assert d[0] == len(d) - 1 and d[3] == 8 and d[2] & 0x80 == 0
    pages = d[4 + 8 :]
    assert pages[0] == 0x08 and pages[2] & 0x04  # caching, WCE on
    d = data(s.cmd(bytes([0x1A, 0x08, 0x0A, 0, 255, 0])))  # DBD, control page
    assert d[3] == 0 and d[4] == 0x0A
    changeable = data(s.cmd(bytes([0x1A, 0x08, 0x4A, 0, 255, 0])))
    assert changeable[4 + 4] & 0x08  # SWP is changeable
    assert sense_of(s.cmd(bytes([0x1A, 0, 0x01, 0, 255, 0]))) == (5, 0x24, 0x00)
    assert sense_of(s.cmd(bytes([0x1A, 0, 0xC8, 0, 255, 0]))) == (5, 0x39, 0x00)  # saved values


def test_mode_sense_10_long_lba() -> None:
    s = Session(make_target()[0])
    d = data(s.cmd(bytes([0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0])))
    assert struct.unpack_from(">H", d, 6)[0] == 16 and d[4] & 0x01
    assert struct.unpack_from(">Q", d, 8)[0] == 4096


def test_mode_select_swp_makes_lun_read_only_and_warns_others() -> None:
    t, lu, _ = make_target()
    s = Session(t)
    other = Session(t, NEXUS_B)
    page = bytearray(lu.mode.current[0x0A])
    page[4] |= 0x08
    param = bytes(4) + bytes(page)
    assert s.cmd(bytes([0x15, 0x10, 0, 0, len(param), 0]), param).status == Status.GOOD
    assert sense_of(s.cmd(cdb10(0x2A, 0, 1), bytes(512))) == (7, 0x27, 0x00)
    assert data(s.cmd(bytes([0x1A, 0x08, 0x0A, 0, 255, 0])))[2] & 0x80  # WP in the header
    assert sense_of(other.cmd(bytes(6))) == (6, 0x2A, 0x01)


def test_mode_select_rejects_unchangeable_bits_with_pointer() -> None:
    t, lu, _ = make_target()
    s = Session(t)
    page = bytearray(lu.mode.current[0x0A])
    page[3] ^= 0x02  # QERR is not changeable
    param = bytes(4) + bytes(page)
    r = s.cmd(bytes([0x15, 0x10, 0, 0, len(param), 0]), param)
    assert sense_of(r) == (5, 0x26, 0x00) and r.sense is not None and r.sense[16:18] == (4 + 3).to_bytes(2, "big")
    assert sense_of(s.cmd(bytes([0x15, 0x11, 0, 0, len(param), 0]), param)) == (5, 0x24, 0x00)  # SP


def test_log_sense() -> None:
    s = Session(make_target()[0])
    d = data(s.cmd(bytes([0x4D, 0, 0x40, 0, 0, 0, 0, 0, 255, 0])))
    assert d[0] == 0 and list(d[4:]) == [0x00, 0x0C, 0x2F]
    assert data(s.cmd(bytes([0x4D, 0, 0x4C, 0, 0, 0, 0, 0, 255, 0])))[0] == 0x0C
    assert sense_of(s.cmd(bytes([0x4D, 0, 0x4E, 0, 0, 0, 0, 0, 255, 0]))) == (5, 0x24, 0x00)


def rsoc(options: int, opcode: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    return bytes([0xA3, 0x0C, options | (0x80 if rctd else 0), opcode]) + sa.to_bytes(2, "big") + \
        (65535).to_bytes(4, "big") + b"\0\0"


def test_report_supported_opcodes() -> None:
    s = Session(make_target()[0])
    d = data(s.cmd(rsoc(0)))
    n = struct.unpack_from(">I", d)[0]
    assert n % 8 == 0 and n // 8 > 50
    d = data(s.cmd(rsoc(0, rctd=True)))
    assert struct.unpack_from(">I", d)[0] % 20 == 0 and d[4 + 5] & 0x02
    one = data(s.cmd(rsoc(1, 0x28)))
    assert one[1] & 0x07 == 3 and struct.unpack_from(">H", one, 2)[0] == 10 and one[4] == 0x28
    assert data(s.cmd(rsoc(1, 0xFF)))[1] & 0x07 == 1
    assert sense_of(s.cmd(rsoc(1, 0x9E))) == (5, 0x24, 0x00)  # has service actions
    two = data(s.cmd(rsoc(2, 0x9E, 0x10)))
    assert two[1] & 0x07 == 3 and two[4:6] == b"\x9e\x10"
    assert sense_of(s.cmd(rsoc(2, 0x28))) == (5, 0x24, 0x00)


def test_report_tmfs_and_thick_lun_vpd() -> None:
    t, _, _ = make_target(MemDevice(thin=False))
    s = Session(t)
    d = data(s.cmd(bytes([0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0])))
    assert d[0] & 0x08 and d[0] & 0x80  # LURS, ATS
    b0 = data(s.cmd(bytes([0x12, 1, 0xB0, 0, 255, 0])))
    assert struct.unpack_from(">II", b0, 20) == (0, 0)


def test_unmap_granularity_is_reported_on_512_byte_luns_only() -> None:
    """4096-byte LUNs leave OPTIMAL UNMAP GRANULARITY at 0 so QEMU 7.2 does not abort on its allocation-map probe."""
    for block_size, want in ((512, 8), (4096, 0)):
        target, _, _ = make_target(MemDevice(num_blocks=1024, block_size=block_size))
        s = Session(target)
        page = bytes(s.cmd(bytes((0x12, 1, 0xB0, 0, 0xFF, 0))).data or b"")
        assert struct.unpack_from(">I", page, 28)[0] == want
        assert struct.unpack_from(">I", page, 20)[0] > 0  # MAXIMUM UNMAP LBA COUNT stays non-zero (Windows)


def test_sanitize_is_advertised_as_implemented() -> None:
    s = Session(make_target()[0])
    for sa, byte1 in ((0x01, 0xA1), (0x02, 0xA2), (0x1F, 0xBF)):
        d = data(s.cmd(rsoc(2, 0x48, sa)))
        assert d[1] & 0x07 == 3 and d[4:14] == bytes((0x48, byte1, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
    assert data(s.cmd(rsoc(2, 0x48, 0x03)))[1] & 0x07 == 1  # CRYPTO ERASE: no encryption, not supported
    b1 = data(s.cmd(bytes([0x12, 1, 0xB1, 0, 255, 0])))
    assert b1[7] >> 6 == 1 and (b1[7] >> 4) & 0x03 == 0  # WABEREQ 01b (reads succeed after BLOCK ERASE), WACEREQ 0
    b0 = data(s.cmd(bytes([0x12, 1, 0xB0, 0, 255, 0])))
    assert b0[4] & 0x01 == 0 and struct.unpack_from(">Q", b0, 36)[0] == 0xFFFF  # WSNZ 0, MAXIMUM WRITE SAME LENGTH

"""Unit tests for lunsync.target.scsi.sbc: data path, ranges, write cache, WRITE SAME, UNMAP, CAW, VERIFY."""

from __future__ import annotations

import struct

from lunsync.target.scsi.task import Status
from tests.target.scsi.memdev import MemDevice, Session, cdb10, cdb16, make_target, sense_of


def session(dev: MemDevice | None = None) -> tuple[Session, MemDevice]:
    t, _, d = make_target(dev)
    return Session(t), d


def test_write_then_read_roundtrip_10_and_16() -> None:
    s, _ = session()
    assert s.cmd(cdb10(0x2A, 10, 2), b"a" * 1024).status == Status.GOOD
    r = s.cmd(cdb16(0x88, 10, 2))
    assert r.status == Status.GOOD and bytes(r.data or b"") == b"a" * 1024


def test_zero_blocks_and_out_of_range() -> None:
    s, _ = session()
    assert s.cmd(cdb10(0x28, 4096, 0)).status == Status.GOOD  # at the end: legal no-op
    assert sense_of(s.cmd(cdb10(0x28, 4097, 0))) == (5, 0x21, 0x00)
    assert sense_of(s.cmd(cdb10(0x28, 4095, 2))) == (5, 0x21, 0x00)
    assert sense_of(s.cmd(cdb16(0x88, 2**64 - 1, 1))) == (5, 0x21, 0x00)


def test_rdprotect_without_pi_is_invalid_field_with_pointer() -> None:
    s, _ = session()
    r = s.cmd(cdb10(0x28, 0, 1, flags=0x20))
    assert sense_of(r) == (5, 0x24, 0x00)
    assert r.sense is not None and r.sense[15:18] == bytes((0xCF, 0x00, 0x01))


def test_read6_zero_means_256_blocks() -> None:
    s, _ = session()
    r = s.cmd(bytes([0x08, 0, 0, 0, 0, 0]))
    assert r.status == Status.GOOD and len(r.data or b"") == 256 * 512


def test_short_data_out_writes_only_whole_blocks() -> None:
    s, dev = session()
    s.cmd(cdb10(0x2A, 0, 2), b"a" * 1024)
    assert s.cmd(cdb10(0x2A, 0, 2), b"b" * 512).status == Status.GOOD
    assert bytes(dev.data[:1024]) == b"b" * 512 + b"a" * 512
    assert s.cmd(cdb10(0x2A, 0, 1), b"c" * 200).status == Status.GOOD
    assert bytes(dev.data[:512]) == b"b" * 512


def test_wce_off_forces_fua() -> None:
    t, lu, dev = make_target()
    s = Session(t)
    s.cmd(cdb10(0x2A, 0, 1), bytes(512))
    assert dev.fua_writes == 0
    lu.wce = False
    s.cmd(cdb10(0x2A, 0, 1), bytes(512))
    assert dev.fua_writes == 1
    lu.wce = True
    s.cmd(cdb10(0x2A, 0, 1, flags=0x08), bytes(512))
    assert dev.fua_writes == 2


def test_read_only_device_refuses_writes() -> None:
    s, _ = session(MemDevice(read_only=True))
    assert sense_of(s.cmd(cdb10(0x2A, 0, 1), bytes(512))) == (7, 0x27, 0x00)
    assert s.cmd(cdb10(0x28, 0, 1)).status == Status.GOOD


def test_verify_bytchk_miscompare_reports_offset() -> None:
    s, _ = session()
    s.cmd(cdb10(0x2A, 0, 2), b"x" * 1024)
    assert s.cmd(cdb10(0x2F, 0, 2, flags=0x02), b"x" * 1024).status == Status.GOOD
    r = s.cmd(cdb10(0x2F, 0, 2, flags=0x02), b"x" * 700 + b"y" * 324)
    assert sense_of(r) == (0xE, 0x1D, 0x00)
    assert r.sense is not None and r.sense[0] & 0x80 and struct.unpack(">I", r.sense[3:7])[0] == 700
    assert s.cmd(cdb10(0x2F, 0, 2), None).status == Status.GOOD  # BYTCHK 0: medium verify only


def test_compare_and_write() -> None:
    s, dev = session()
    s.cmd(cdb10(0x2A, 5, 1), b"A" * 512)
    caw = bytes([0x89, 0]) + (5).to_bytes(8, "big") + bytes([0, 0, 0, 1, 0])
    assert s.cmd(caw, b"A" * 512 + b"B" * 512).status == Status.GOOD
    assert bytes(dev.data[5 * 512 : 6 * 512]) == b"B" * 512
    r = s.cmd(caw, b"B" * 100 + b"Z" + b"B" * 411 + b"C" * 512)
    assert sense_of(r) == (0xE, 0x1D, 0x00) and r.sense is not None and r.sense[3:7] == (100).to_bytes(4, "big")
    assert bytes(dev.data[5 * 512 : 6 * 512]) == b"B" * 512
    assert sense_of(s.cmd(caw, b"B" * 512)) == (5, 0x24, 0x00)  # wrong Data-Out size


def test_write_same_unmap_and_plain() -> None:
    s, dev = session()
    s.cmd(cdb10(0x2A, 0, 8), b"\xff" * 4096)
    assert s.cmd(cdb10(0x41, 0, 8, flags=0x08), b"\xff" * 512).status == Status.GOOD
    assert bytes(dev.data[:4096]) == bytes(4096) and not any(dev.mapped[:8])
    assert s.cmd(cdb16(0x93, 100, 3), b"q" * 512).status == Status.GOOD
    assert bytes(dev.data[100 * 512 : 103 * 512]) == b"q" * 1536
    assert sense_of(s.cmd(cdb10(0x41, 0, 0), b"q" * 512)) == (5, 0x24, 0x00)  # WSNZ
    assert sense_of(s.cmd(cdb10(0x41, 0, 1), b"q" * 1024))[0] == 5
    assert sense_of(s.cmd(cdb10(0x41, 4095, 2), b"q" * 512)) == (5, 0x21, 0x00)


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(body), len(body)) + body


def test_unmap_and_get_lba_status() -> None:
    s, dev = session()
    s.cmd(cdb10(0x2A, 0, 16), b"z" * 8192)
    params = unmap_list((4, 4))
    assert s.cmd(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, len(params), 0]), params).status == Status.GOOD
    assert not any(dev.mapped[4:8]) and all(dev.mapped[8:16])
    r = s.cmd(bytes([0x9E, 0x12]) + (5).to_bytes(8, "big") + (24).to_bytes(4, "big") + b"\x00\x00")
    lba, n, status = struct.unpack_from(">QIB", bytes(r.data or b""), 8)
    assert (lba, n, status) == (5, 3, 1)


def test_unmap_validation() -> None:
    s, _ = session()
    assert s.cmd(bytes([0x42] + [0] * 9)).status == Status.GOOD  # empty list
    assert sense_of(s.cmd(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0]), b"\0" * 4)) == (5, 0x1A, 0x00)
    bad = unmap_list((4090, 10))
    assert sense_of(s.cmd(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, len(bad), 0]), bad)) == (5, 0x21, 0x00)
    too_many = unmap_list(*[(i, 1) for i in range(257)])
    cdb = bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(too_many).to_bytes(2, "big") + b"\0"
    assert sense_of(s.cmd(cdb, too_many)) == (5, 0x26, 0x00)


def test_unmap_unsupported_on_thick() -> None:
    s, _ = session(MemDevice(thin=False))
    p = unmap_list((0, 1))
    assert sense_of(s.cmd(bytes([0x42, 0, 0, 0, 0, 0, 0, 0, len(p), 0]), p)) == (5, 0x20, 0x00)


def test_read_capacity() -> None:
    s, _ = session()
    r10 = bytes(s.cmd(bytes(10).replace(b"\0", b"\x25", 1)).data or b"")
    assert struct.unpack(">II", r10) == (4095, 512)
    r16 = bytes(s.cmd(bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0").data or b"")
    assert struct.unpack_from(">QI", r16) == (4095, 512) and r16[14] & 0xC0 == 0xC0


def test_orwrite_and_start_stop() -> None:
    s, dev = session()
    s.cmd(cdb10(0x2A, 0, 1), b"\x0f" * 512)
    assert s.cmd(cdb16(0x8B, 0, 1), b"\xf0" * 512).status == Status.GOOD
    assert bytes(dev.data[:512]) == b"\xff" * 512
    assert sense_of(s.cmd(bytes([0x1B, 0, 0, 0, 0x02, 0]))) == (5, 0x24, 0x00)  # LOEJ: not removable
    assert s.cmd(bytes([0x1B, 0, 0, 0, 0x01, 0])).status == Status.GOOD
    assert s.cmd(cdb10(0x35, 0, 0)).status == Status.GOOD and dev.flushes == 1

"""Unit tests for lunsync.target.scsi.sbc: data path, ranges, write cache, WRITE SAME, UNMAP, CAW, VERIFY."""

from __future__ import annotations

import asyncio
import struct

import pytest
from lunsync.snapshots.device import Buffer
from lunsync.snapshots.errors import MediumError
from lunsync.target.scsi.task import Nexus, ScsiResponse, ScsiTask, Status, TmfFunction

from tests.target.scsi.memdev import (
    IDENTITY,
    NEXUS_A,
    NEXUS_B,
    InlineMemDevice,
    MemDevice,
    Session,
    cdb10,
    cdb16,
    make_target,
    sense_of,
)


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


def test_a_plain_write_lands_inline_and_anything_more_awaits_the_device_write() -> None:
    dev = InlineMemDevice()
    t, lu, _ = make_target(dev)
    s = Session(t)
    # A write-back WRITE with no gate held goes through the device's inline write, and the dispatcher answers it
    # within the call: nothing below it was created to be awaited.
    done = t.execute_now(_task(cdb10(0x2A, 8, 2), b"i" * 1024, 50))
    assert isinstance(done, ScsiResponse) and done.status == Status.GOOD
    assert (dev.inline_writes, dev.writes) == (1, 0) and bytes(dev.data[8 * 512 : 10 * 512]) == b"i" * 1024
    # FUA, and every write while the write cache is off, must be durable: the device's write, with fua.
    assert s.cmd(cdb10(0x2A, 0, 1, flags=0x08), b"f" * 512).status == Status.GOOD
    lu.wce = False
    assert s.cmd(cdb10(0x2A, 1, 1), b"w" * 512).status == Status.GOOD
    lu.wce = True
    assert (dev.inline_writes, dev.writes, dev.fua_writes) == (1, 2, 2)
    # A device that declines (a snapshot needs a copy first) gets the write through its coroutine, not lost.
    dev.inline_ok = False
    assert s.cmd(cdb10(0x2A, 2, 1), b"d" * 512).status == Status.GOOD
    dev.inline_ok = True
    assert (dev.inline_writes, dev.writes) == (1, 3) and bytes(dev.data[2 * 512 : 3 * 512]) == b"d" * 512
    # While an exclusive holder is registered, a write queues at the gate rather than landing inline.
    lu.gate.active += 1
    assert s.cmd(cdb10(0x2A, 3, 1), b"g" * 512).status == Status.GOOD
    lu.gate.active -= 1
    assert (dev.inline_writes, dev.writes) == (1, 4)
    # An inline write's storage error is answered like the device write's.
    dev.fail_next = MediumError("boom", lba=4, write=True)
    assert sense_of(s.cmd(cdb10(0x2A, 4, 1), b"e" * 512)) == (3, 0x0C, 0x00)
    assert dev.inline_writes == 1
    # Checks come first: a write past the end or to a protected LU reaches neither path.
    assert sense_of(s.cmd(cdb10(0x2A, 4095, 2), b"x" * 1024)) == (5, 0x21, 0x00)
    lu.swp = True
    assert sense_of(s.cmd(cdb10(0x2A, 0, 1), b"x" * 512)) == (7, 0x27, 0x00)
    assert (dev.inline_writes, dev.writes) == (1, 4)


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
    assert sense_of(s.cmd(cdb10(0x41, 4096, 0), b"q" * 512)) == (5, 0x21, 0x00)  # zero blocks from past the end
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


def test_write_same_zero_blocks_runs_to_the_end_within_the_maximum() -> None:
    t, lu, dev = make_target()
    s = Session(t)
    assert s.cmd(cdb16(0x93, 4000, 0), b"z" * 512).status == Status.GOOD  # WSNZ 0: 96 blocks, to the end
    assert bytes(dev.data[4000 * 512 :]) == b"z" * 96 * 512 and bytes(dev.data[3999 * 512 : 4000 * 512]) == bytes(512)
    lu.max_write_same_blocks = 95
    r = s.cmd(cdb16(0x93, 4000, 0), b"y" * 512)
    assert sense_of(r) == (5, 0x24, 0x00) and r.sense is not None and r.sense[15:18] == b"\xc0\x00\x0a"
    assert sense_of(s.cmd(cdb16(0x93, 4096, 0), b"y" * 512)) == (5, 0x21, 0x00)


# -- COMPARE AND WRITE atomicity against other writes ------------------------------------------------------------


class PausingDevice(MemDevice):
    """Reads copy the data, then wait for ``resume``: a write can arrive between a CAW's read and its write."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.resume = asyncio.Event()
        self.pause_reads = True

    async def read(self, lba: int, blocks: int) -> Buffer:
        data = await super().read(lba, blocks)
        if self.pause_reads:
            self.pause_reads = False
            self.reading.set()
            await self.resume.wait()
        return data


def _task(cdb: bytes, data: bytes | None = None, tag: int = 1, nexus: Nexus = NEXUS_A) -> ScsiTask:
    return ScsiTask(nexus, 0, cdb, tag, data_out=data, expected_in=65536)


def _caw_cdb(lba: int, blocks: int) -> bytes:
    return bytes((0x89, 0)) + lba.to_bytes(8, "big") + bytes((0, 0, 0, blocks, 0, 0))


@pytest.mark.parametrize(
    "other",
    [
        (cdb10(0x2A, 0, 1), b"c" * 512, b"c" * 512),  # WRITE(10)
        (cdb10(0x41, 0, 1), b"c" * 512, b"c" * 512),  # WRITE SAME(10)
        (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), struct.pack(">HH4xQI4x", 22, 16, 0, 1), bytes(512)),  # UNMAP
    ],
    ids=["write", "write_same", "unmap"],
)
def test_writes_wait_for_an_overlapping_compare_and_write(other: tuple[bytes, bytes, bytes]) -> None:
    cdb, payload, final = other

    async def main() -> None:
        dev = PausingDevice()
        dev.data[:512] = b"a" * 512
        t, _, _ = make_target(dev)
        await t.execute(_task(bytes(6)))  # POWER ON UA
        caw = asyncio.create_task(t.execute(_task(_caw_cdb(0, 1), b"a" * 512 + b"b" * 512, 2)))
        await dev.reading.wait()  # the CAW has read and compared; a write now would be lost under its write
        plain = asyncio.create_task(t.execute(_task(cdb, payload, 3)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not plain.done() and bytes(dev.data[:512]) == b"a" * 512
        dev.resume.set()
        assert (await caw).status == Status.GOOD
        assert (await plain).status == Status.GOOD
        assert bytes(dev.data[:512]) == final  # ordered after the CAW, not swallowed by it

    asyncio.run(main())


def test_non_overlapping_write_is_not_held_by_a_compare_and_write() -> None:
    async def main() -> None:
        dev = PausingDevice()
        t, lu, _ = make_target(dev)
        await t.execute(_task(bytes(6)))
        caw = asyncio.create_task(t.execute(_task(_caw_cdb(0, 1), bytes(512) + b"b" * 512, 2)))
        await dev.reading.wait()
        assert lu.gate.active == 1
        assert (await t.execute(_task(cdb10(0x2A, 1, 1), b"c" * 512, 3))).status == Status.GOOD
        dev.resume.set()
        assert (await caw).status == Status.GOOD and lu.gate.active == 0

    asyncio.run(main())


def test_extended_copy_destination_waits_for_a_compare_and_write() -> None:
    async def main() -> None:
        dev = PausingDevice()
        dev.data[512:1024] = b"x" * 512
        t, _, _ = make_target(dev)
        await t.execute(_task(bytes(6)))
        caw = asyncio.create_task(t.execute(_task(_caw_cdb(0, 1), bytes(512) + b"b" * 512, 2)))
        await dev.reading.wait()
        d = bytearray(32)
        d[0], d[4], d[5], d[7] = 0xE4, 0x01, 0x03, 16
        d[8:24] = IDENTITY.naa
        seg = struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 0, 1, 1, 0)  # copy block 1 over block 0
        params = struct.pack(">BBH4xII", 1, 0, 32, len(seg), 0) + bytes(d) + seg
        xcopy = asyncio.create_task(
            t.execute(_task(bytes([0x83, 0] + [0] * 8) + len(params).to_bytes(4, "big") + b"\0\0", params, 3)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not xcopy.done()
        dev.resume.set()
        assert (await caw).status == Status.GOOD and (await xcopy).status == Status.GOOD
        assert bytes(dev.data[:512]) == b"x" * 512

    asyncio.run(main())


# -- SANITIZE ------------------------------------------------------------------------------------------------------


def sanitize_cdb(sa: int, length: int = 0, *, immed: bool = False, ause: bool = False) -> bytes:
    return bytes((0x48, (0x80 if immed else 0) | (0x20 if ause else 0) | sa, 0, 0, 0, 0, 0)) + length.to_bytes(
        2, "big") + b"\0"


def overwrite_params(pattern: bytes, count: int = 1, invert: bool = False) -> bytes:
    return bytes(((0x80 if invert else 0) | count, 0)) + len(pattern).to_bytes(2, "big") + pattern


def test_sanitize_overwrite_repeats_the_pattern_and_ends_on_it_with_invert() -> None:
    s, dev = session()
    p = overwrite_params(b"\x0f\xf0", count=2, invert=True)
    writes = dev.writes
    assert s.cmd(sanitize_cdb(0x01, len(p)), p).status == Status.GOOD
    assert bytes(dev.data) == b"\x0f\xf0" * (len(dev.data) // 2)
    assert dev.writes - writes == 2 * 2 and dev.flushes == 1  # two passes of two 1 MiB chunks, then one flush


def test_sanitize_overwrite_field_checks() -> None:
    s, _ = session()
    good = overwrite_params(b"\xaa" * 512)
    for length in (0, 4, 517):
        r = s.cmd(sanitize_cdb(0x01, length), good + bytes(8))
        assert sense_of(r) == (5, 0x24, 0x00) and r.sense is not None and r.sense[15:18] == b"\xc0\x00\x07"
    assert sense_of(s.cmd(sanitize_cdb(0x01, 516), overwrite_params(b"\xaa" * 512, count=0))) == (5, 0x26, 0x00)
    assert sense_of(s.cmd(sanitize_cdb(0x01, 8), b"\x01\x00\x00\x00" + bytes(4))) == (5, 0x26, 0x00)  # empty pattern
    assert sense_of(s.cmd(sanitize_cdb(0x01, 516), b"\x01\x00\x02\x04" + bytes(512))) == (5, 0x26, 0x00)
    cdb = bytearray(sanitize_cdb(0x01, 516))
    cdb[1] |= 0x40
    r = s.cmd(cdb, good)
    assert sense_of(r) == (5, 0x24, 0x00) and r.sense is not None and r.sense[15] == 0xCE  # byte 1, bit 6
    for i in range(2, 7):
        cdb = bytearray(sanitize_cdb(0x01, 516))
        cdb[i] = i
        assert sense_of(s.cmd(cdb, good)) == (5, 0x24, 0x00)


def test_sanitize_block_erase_unmaps_a_thin_lun_and_zeroes_a_thick_one() -> None:
    s, dev = session()
    s.cmd(cdb10(0x2A, 0, 8), b"a" * 4096)
    assert s.cmd(sanitize_cdb(0x02)).status == Status.GOOD
    assert not any(dev.mapped) and not any(dev.data)
    assert sense_of(s.cmd(sanitize_cdb(0x02, 8), bytes(8))) == (5, 0x24, 0x00)
    s, dev = session(MemDevice(thin=False))
    s.cmd(cdb10(0x2A, 4095, 1), b"a" * 512)
    assert s.cmd(sanitize_cdb(0x02)).status == Status.GOOD
    assert not any(dev.data)


def test_sanitize_unsupported_and_refused() -> None:
    s, _ = session()
    r = s.cmd(sanitize_cdb(0x03))  # CRYPTO ERASE: nothing is encrypted
    assert sense_of(r) == (5, 0x24, 0x00) and r.sense is not None and r.sense[15:18] == b"\xcc\x00\x01"
    assert sense_of(s.cmd(sanitize_cdb(0x00))) == (5, 0x24, 0x00)
    s, _ = session(MemDevice(read_only=True))
    assert sense_of(s.cmd(sanitize_cdb(0x02))) == (7, 0x27, 0x00)
    p = overwrite_params(b"\x00")
    assert sense_of(s.cmd(sanitize_cdb(0x01, len(p)), p)) == (7, 0x27, 0x00)


def test_sanitize_conflicts_with_another_nexus_reservation() -> None:
    t, _, _ = make_target()
    a, b = Session(t, NEXUS_A), Session(t, NEXUS_B)
    assert b.cmd(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.GOOD  # RESERVE(6)
    assert a.cmd(sanitize_cdb(0x02)).status == Status.RESERVATION_CONFLICT
    assert b.cmd(sanitize_cdb(0x02)).status == Status.GOOD


class GatedWriteDevice(MemDevice):
    """Each write waits for a token, so a test can hold a SANITIZE in progress and look at the LU meanwhile."""

    def __init__(self, num_blocks: int = 4096, *, thin: bool = True) -> None:
        super().__init__(num_blocks, thin=thin)
        self.tokens = asyncio.Semaphore(0)

    async def write(self, lba: int, data: Buffer, fua: bool = False) -> None:
        await self.tokens.acquire()
        await super().write(lba, data, fua)


def test_sanitize_immed_reports_progress_and_survives_abort_and_reset() -> None:
    async def main() -> None:
        dev = GatedWriteDevice()
        t, lu, _ = make_target(dev)
        await t.execute(_task(bytes(6)))
        await t.execute(_task(bytes(6), nexus=NEXUS_B))
        p = overwrite_params(b"\x5a")
        assert (await t.execute(_task(sanitize_cdb(0x01, len(p), immed=True), p, 2))).status == Status.GOOD
        assert lu.sanitize is not None and lu.sanitize.task is not None
        job = lu.sanitize.task
        dev.tokens.release()  # one of the two 1 MiB chunks
        for _ in range(5):
            await asyncio.sleep(0)
        r = await t.execute(_task(bytes(6), tag=3))
        assert sense_of(r) == (2, 0x04, 0x1B) and r.sense is not None and r.sense[15:18] == b"\x80\x80\x00"  # 50 %
        assert sense_of(await t.execute(_task(cdb10(0x28, 0, 1), tag=4))) == (2, 0x04, 0x1B)
        assert (await t.execute(_task(bytes([0x12, 0, 0, 0, 96, 0]), tag=5))).status == Status.GOOD
        rs = await t.execute(_task(bytes([0x03, 0, 0, 0, 18, 0]), tag=6))
        assert rs.status == Status.GOOD and rs.data is not None and (rs.data[2], rs.data[12], rs.data[13]) == (2, 4, 0x1B)
        # A waiting SANITIZE from another nexus is refused, and ending the command that started one does not stop it.
        assert sense_of(await t.execute(_task(sanitize_cdb(0x02), tag=7, nexus=NEXUS_B))) == (2, 0x04, 0x1B)
        t.reset(TmfFunction.LOGICAL_UNIT_RESET, NEXUS_B, 0)
        t.nexus_lost(NEXUS_A)
        dev.tokens.release()
        await asyncio.wait_for(job, 1)
        assert lu.sanitize is None and bytes(dev.data) == b"\x5a" * len(dev.data)
        assert sense_of(await t.execute(_task(bytes(6), tag=8, nexus=NEXUS_B))) == (6, 0x29, 0x03)  # issuer too
        assert (await t.execute(_task(bytes(6), tag=10, nexus=NEXUS_B))).status == Status.GOOD
        assert sense_of(await t.execute(_task(bytes(6), tag=9))) == (6, 0x29, 0x03)  # A still learns of B's reset

    asyncio.run(main())


def test_aborting_a_waiting_sanitize_command_leaves_the_operation_running() -> None:
    async def main() -> None:
        dev = GatedWriteDevice()
        t, lu, _ = make_target(dev)
        await t.execute(_task(bytes(6)))
        cmd = asyncio.create_task(t.execute(_task(sanitize_cdb(0x01, 5), overwrite_params(b"\x11"), 2)))
        for _ in range(5):
            await asyncio.sleep(0)
        cmd.cancel()  # ABORT TASK
        with pytest.raises(asyncio.CancelledError):
            await cmd
        assert lu.sanitize is not None and lu.sanitize.task is not None
        dev.tokens.release()
        dev.tokens.release()
        await lu.sanitize.task
        assert lu.sanitize is None and bytes(dev.data) == b"\x11" * len(dev.data)

    asyncio.run(main())


def test_sanitize_failure_mode_and_its_exits() -> None:
    async def main() -> None:
        dev = MemDevice()
        t, lu, _ = make_target(dev)
        await t.execute(_task(bytes(6)))
        p = overwrite_params(b"\x33")
        dev.fail_next = MediumError("boom", lba=0, write=True)
        assert sense_of(await t.execute(_task(sanitize_cdb(0x01, len(p)), p, 2))) == (3, 0x31, 0x03)
        assert sense_of(await t.execute(_task(bytes(6), tag=3))) == (3, 0x31, 0x03)
        # Restricted completion mode (AUSE 0): neither EXIT FAILURE MODE nor an unrestricted sanitize may leave it.
        r = await t.execute(_task(sanitize_cdb(0x1F), tag=4))
        assert sense_of(r) == (5, 0x24, 0x00)
        assert sense_of(await t.execute(_task(sanitize_cdb(0x02, ause=True), tag=5))) == (5, 0x24, 0x00)
        assert (await t.execute(_task(sanitize_cdb(0x02), tag=6))).status == Status.GOOD  # success ends it
        assert (await t.execute(_task(bytes(6), tag=7))).status == Status.GOOD
        # Unrestricted mode (AUSE 1): EXIT FAILURE MODE leaves it.
        dev.fail_next = MediumError("boom", lba=0, write=True)
        assert sense_of(await t.execute(_task(sanitize_cdb(0x01, len(p), ause=True), p, 8))) == (3, 0x31, 0x03)
        assert sense_of(await t.execute(_task(sanitize_cdb(0x1F, 8), bytes(8), 9))) == (5, 0x24, 0x00)
        assert (await t.execute(_task(sanitize_cdb(0x1F), tag=10))).status == Status.GOOD
        assert lu.sanitize is None and (await t.execute(_task(bytes(6), tag=11))).status == Status.GOOD

    asyncio.run(main())


def test_write_same_on_a_read_only_lun_is_write_protected_even_without_data_out() -> None:
    s, _ = session(MemDevice(read_only=True))
    assert sense_of(s.cmd(cdb10(0x41, 0, 1, flags=0x08))) == (7, 0x27, 0x00)  # UNMAP=1, no Data-Out sent
    assert sense_of(s.cmd(cdb16(0x93, 0, 1), b"q" * 512)) == (7, 0x27, 0x00)

"""Tests for lunsync.snapshots.resync: a ResyncVolume over two real FileBackends in tmp_path.

The source holds pattern A, the destination pattern B, so every byte read says where it came from.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lunsync.snapshots.backend import FileBackend
from lunsync.snapshots.device import BlockDevice
from lunsync.snapshots.resync import (
    AdaptiveThrottle,
    BitmapFile,
    FixedRate,
    LatencyMonitor,
    RegionBitmap,
    ResyncState,
    ResyncVolume,
    Unthrottled,
)

T = TypeVar("T")
KiB, MiB = 1 << 10, 1 << 20
REGION = 64 * KiB
BS = 512
RB = REGION // BS  # blocks per region


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def fill(n: int, byte: int) -> bytes:
    return bytes([byte]) * n


def pattern(nbytes: int, seed: int) -> bytes:
    block = bytes((seed * 31 + i) % 251 + 1 for i in range(4096))
    return (block * (nbytes // 4096 + 1))[:nbytes]


def make_pair(tmp_path: Path, size: int = 2 * MiB, dest_size: int | None = None,
              dest_data: bytes | None = None) -> tuple[FileBackend, FileBackend, bytes]:
    a = pattern(size, 1)
    with open(tmp_path / "src.img", "wb") as f:
        f.write(a)
    dsize = dest_size or size
    with open(tmp_path / "dst.img", "wb") as f:
        f.write(dest_data if dest_data is not None else pattern(dsize, 2))
    src = FileBackend.open(tmp_path / "src.img", BS, read_only=True)
    dst = FileBackend.open(tmp_path / "dst.img", BS)
    return src, dst, a


async def vol_of(tmp_path: Path, src: FileBackend, dst: FileBackend, **kw: Any) -> ResyncVolume:
    kw.setdefault("throttle", Unthrottled())
    return await ResyncVolume.open(src, dst, tmp_path / "job.bitmap", region_bytes=REGION, **kw)


def test_is_a_block_device_and_reads_are_redirected(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, a = make_pair(tmp_path)
        vol = await vol_of(tmp_path, src, dst)
        assert isinstance(vol, BlockDevice)
        assert vol.num_blocks == dst.num_blocks and not vol.read_only
        # Nothing copied yet: every byte comes from the source, whatever the destination holds.
        assert bytes(await vol.read(0, 2 * MiB // BS)) == a
        assert bytes(await vol.read(RB - 3, 7)) == a[(RB - 3) * BS:(RB + 4) * BS]
        assert vol.redirected_reads == 2
        assert vol.redirected_read_bytes == 2 * MiB + 7 * BS
        # The first commit happened before open returned: a crash now resumes with everything pending.
        image = BitmapFile(tmp_path / "job.bitmap").load()
        assert image is not None and image.bits.count(1) == 2 * MiB // REGION
        assert vol.progress().bytes_total == 2 * MiB
        await src.close()
        await dst.close()

    run(main())


def test_full_region_write_marks_done_without_copy(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, a = make_pair(tmp_path)
        vol = await vol_of(tmp_path, src, dst)
        c = fill(2 * REGION, 0xCC)
        await vol.write(RB, c)  # regions 1 and 2, exactly
        assert not vol.bitmap.is_pending(1) and not vol.bitmap.is_pending(2)
        assert vol.bitmap.is_pending(0) and vol.bitmap.is_pending(3)
        assert vol.bytes_copied == 0
        got = bytes(await vol.read(0, 4 * RB))
        assert got == a[:REGION] + c + a[3 * REGION:4 * REGION]
        await src.close()
        await dst.close()

    run(main())


def test_partial_write_brings_its_region_over_first(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, a = make_pair(tmp_path)
        vol = await vol_of(tmp_path, src, dst)
        await vol.write(RB + 8, fill(BS * 4, 0xCC))  # 2 KiB inside region 1
        assert not vol.bitmap.is_pending(1)
        assert vol.bytes_copied == REGION
        region = bytes(await dst.read(RB, RB))  # straight from the destination: the rest of it must be A
        want = bytearray(a[REGION:2 * REGION])
        want[8 * BS:12 * BS] = fill(BS * 4, 0xCC)
        assert region == bytes(want)
        # A write spanning a region boundary: two partial regions, both brought over.
        await vol.write(3 * RB - 1, fill(2 * BS, 0xDD))
        assert not vol.bitmap.is_pending(2) and not vol.bitmap.is_pending(3)
        got = bytes(await vol.read(2 * RB, 2 * RB))
        want2 = bytearray(a[2 * REGION:4 * REGION])
        want2[REGION - BS:REGION + BS] = fill(2 * BS, 0xDD)
        assert got == bytes(want2)
        await src.close()
        await dst.close()

    run(main())


def test_unmap_marks_regions_done(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, a = make_pair(tmp_path)
        vol = await vol_of(tmp_path, src, dst)
        await vol.unmap([(0, RB), (RB * 2 + 1, 2)])
        assert not vol.bitmap.is_pending(0) and not vol.bitmap.is_pending(2)
        assert bytes(await vol.read(0, RB)) == bytes(REGION)
        got = bytes(await vol.read(2 * RB, RB))
        want = bytearray(a[2 * REGION:3 * REGION])
        want[BS:3 * BS] = bytes(2 * BS)
        assert got == bytes(want)  # the partial unmap kept the rest of the region: it was brought over first
        await src.close()
        await dst.close()

    run(main())


def test_copier_completes_and_commits_after_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        src, dst, a = make_pair(tmp_path, 4 * MiB)
        order: list[str] = []
        real_sync, real_save, dst_fd = os.fdatasync, BitmapFile.save, dst.fileno()

        def fdatasync(fd: int) -> None:
            # The destination's flush, seen at its syscall: the backend may be a compiled class, whose methods cannot
            # be replaced on an instance.
            if fd == dst_fd:
                order.append("flush")
            real_sync(fd)

        def save(self: BitmapFile, image: Any) -> None:
            order.append("save")
            real_save(self, image)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(BitmapFile, "save", save)
        vol = await vol_of(tmp_path, src, dst, batch_bytes=MiB, commit_interval_s=0.0)
        vol.start()
        assert await asyncio.wait_for(vol.wait(), 10) is ResyncState.DONE
        p = vol.progress()
        assert p.percent == 100.0 and p.bytes_copied == 4 * MiB and p.regions_pending == 0
        assert bytes(await dst.read(0, dst.num_blocks)) == a
        assert not (tmp_path / "job.bitmap").exists()  # a finished job leaves no bitmap to resume
        # Every bitmap save after the first (made at open, before any copy) follows a destination flush.
        saves = [i for i, op in enumerate(order) if op == "save"]
        assert len(saves) >= 3
        for i in saves[1:]:
            assert order[i - 1] == "flush", order
        await src.close()
        await dst.close()

    run(main())


def test_crash_resumes_from_the_last_commit(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, a = make_pair(tmp_path, 4 * MiB)
        vol = await vol_of(tmp_path, src, dst, throttle=FixedRate(4 * MiB), commit_interval_s=0.0)
        vol.start()
        while vol.commits < 2:
            await asyncio.sleep(0.01)
        # kill -9: the copier vanishes mid-flight, nothing more is committed, the in-memory bitmap is lost.
        assert vol._task is not None
        vol._task.cancel()
        await asyncio.sleep(0)
        committed = BitmapFile(tmp_path / "job.bitmap").load()
        assert committed is not None
        left = committed.bits.count(1)
        assert 0 < left < 4 * MiB // REGION
        again = await vol_of(tmp_path, src, dst)
        assert again.bitmap.pending == left  # resumed, not restarted
        assert again.progress().bytes_total == 4 * MiB
        assert again.progress().bytes_done == 4 * MiB - left * REGION
        again.start()
        assert await asyncio.wait_for(again.wait(), 10) is ResyncState.DONE
        assert bytes(await dst.read(0, dst.num_blocks)) == a
        await src.close()
        await dst.close()

    run(main())


def test_uncommitted_foreground_write_region_is_pending_again_after_a_crash(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, _ = make_pair(tmp_path)
        vol = await vol_of(tmp_path, src, dst)
        await vol.write(0, fill(REGION, 0xCC))  # no flush: the initiator has not asked for durability
        image = BitmapFile(tmp_path / "job.bitmap").load()
        assert image is not None and image.bits[0] == 1
        await vol.flush()  # SYNCHRONIZE CACHE commits the bitmap
        image = BitmapFile(tmp_path / "job.bitmap").load()
        assert image is not None and image.bits[0] == 0
        await vol.write(RB, fill(REGION, 0xDD), fua=True)  # FUA commits too
        image = BitmapFile(tmp_path / "job.bitmap").load()
        assert image is not None and image.bits[1] == 0
        await src.close()
        await dst.close()

    run(main())


def test_cancel_stops_the_copier_and_drops_the_bitmap(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, _ = make_pair(tmp_path, 8 * MiB)
        vol = await vol_of(tmp_path, src, dst, throttle=FixedRate(2 * MiB))
        vol.start()
        await asyncio.sleep(0.2)
        await vol.cancel()
        assert await vol.wait() is ResyncState.CANCELLED
        assert vol.bitmap.pending > 0
        copied = vol.bytes_copied
        await asyncio.sleep(0.3)
        assert vol.bytes_copied == copied  # nothing moves after cancel
        assert not (tmp_path / "job.bitmap").exists()
        await src.close()
        await dst.close()

    run(main())


def test_only_changed_regions_are_copied(tmp_path: Path) -> None:
    async def main() -> None:
        size = 2 * MiB
        a = pattern(size, 1)
        changed = bytearray(a)
        for r in (3, 17, 30):
            changed[r * REGION:(r + 1) * REGION] = fill(REGION, 0xBB)
        src, dst, _ = make_pair(tmp_path, size, dest_data=bytes(changed))
        vol = await vol_of(tmp_path, src, dst, pending_regions={3, 17, 30})
        assert vol.progress().bytes_total == 3 * REGION
        assert bytes(await vol.read(0, size // BS)) == a  # already the snapshot's contents, before any copy
        vol.start()
        assert await asyncio.wait_for(vol.wait(), 10) is ResyncState.DONE
        assert vol.bytes_copied == 3 * REGION
        assert bytes(await dst.read(0, size // BS)) == a
        await src.close()
        await dst.close()

    run(main())


def test_sparse_source_punches_instead_of_copying(tmp_path: Path) -> None:
    async def main() -> None:
        src_path = tmp_path / "src.img"
        src = FileBackend.create(src_path, 64 * MiB, BS)
        await src.write(10 * RB, fill(REGION, 0x5A))
        await src.flush()
        dst = FileBackend.create(tmp_path / "dst.img", 64 * MiB, BS)
        await dst.write(0, fill(MiB, 0x77))  # old data where the source is a hole: must read zeros afterwards
        vol = await vol_of(tmp_path, src, dst)
        vol.start()
        assert await asyncio.wait_for(vol.wait(), 20) is ResyncState.DONE
        assert vol.bytes_copied == REGION  # only the mapped region moved
        assert bytes(await dst.read(0, 2 * RB)) == bytes(2 * REGION)
        assert bytes(await dst.read(10 * RB, RB)) == fill(REGION, 0x5A)
        assert os.stat(dst.path).st_blocks * 512 <= 2 * MiB  # still sparse
        await src.close()
        await dst.close()

    run(main())


def test_larger_destination_keeps_its_tail(tmp_path: Path) -> None:
    async def main() -> None:
        size = MiB + 8 * BS  # not a whole number of regions
        src, dst, a = make_pair(tmp_path, size, dest_size=2 * MiB)
        tail = pattern(2 * MiB, 2)[size:]
        vol = await vol_of(tmp_path, src, dst)
        got = bytes(await vol.read(0, 2 * MiB // BS))
        assert got == a + tail
        vol.start()
        assert await asyncio.wait_for(vol.wait(), 10) is ResyncState.DONE
        assert bytes(await dst.read(0, 2 * MiB // BS)) == a + tail
        await src.close()
        await dst.close()

    run(main())


def test_fixed_rate_limits_the_copier(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, _ = make_pair(tmp_path, 2 * MiB)
        vol = await vol_of(tmp_path, src, dst, throttle=FixedRate(4 * MiB))
        t0 = time.monotonic()
        vol.start()
        await asyncio.wait_for(vol.wait(), 10)
        # 2 MiB at 4 MiB/s with a quarter-second burst: at least ~0.25 s.
        assert time.monotonic() - t0 >= 0.2
        await src.close()
        await dst.close()

    run(main())


def test_adaptive_throttle_backs_off_on_latency_and_recovers() -> None:
    now = [100.0]
    mon = LatencyMonitor(baseline_s=0.001)
    thr = AdaptiveThrottle(mon, clock=lambda: now[0])

    async def main() -> None:
        await thr.pace(8 * MiB, 0.01)  # unhurt: unlimited
        assert thr.rate_bps is None
        for _ in range(50):
            mon.record(0.010, now[0])  # 10x the baseline
        await thr.pace(MiB, 0.001)
        first = thr.rate_bps
        assert first is not None and first < 800 * MiB
        await thr.pace(MiB, 0.001)
        assert thr.rate_bps is not None and thr.rate_bps < first
        assert thr.batch_bytes(32 * MiB) < 32 * MiB
        now[0] += 5  # initiators went quiet: the copier speeds back up
        for _ in range(100):
            await thr.pace(MiB, 0.001)
        assert thr.rate_bps is None

    run(main())


def test_latency_monitor_learns_a_baseline() -> None:
    mon = LatencyMonitor()
    for i in range(100):
        mon.record(0.0005, float(i) / 100)
    assert mon.baseline_s is not None and abs(mon.baseline_s - 0.0005) < 1e-4
    for i in range(100):
        mon.record(0.005, 1 + float(i) / 100)
    assert mon.ewma_s is not None and mon.ewma_s > 3 * mon.baseline_s


def test_region_bitmap_runs() -> None:
    bm = RegionBitmap(10, [2, 3, 4, 7])
    assert bm.pending == 4 and bm.next_pending(0) == 2 and bm.run_end(2, 10) == 5
    assert bm.any_pending(5, 7) and not bm.any_pending(5, 6)
    assert bm.mark_done(3) and not bm.mark_done(3) and bm.pending == 3


def test_damaged_bitmap_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        src, dst, _ = make_pair(tmp_path)
        await vol_of(tmp_path, src, dst)
        blob = bytearray((tmp_path / "job.bitmap").read_bytes())
        blob[-1] ^= 0xFF
        (tmp_path / "job.bitmap").write_bytes(bytes(blob))
        with pytest.raises(Exception, match="not a valid resync bitmap"):
            await vol_of(tmp_path, src, dst)
        await src.close()
        await dst.close()

    run(main())


def test_concurrent_writes_and_copier_keep_the_newest_data(tmp_path: Path) -> None:
    async def main() -> None:
        size = 4 * MiB
        src, dst, a = make_pair(tmp_path, size)
        vol = await vol_of(tmp_path, src, dst, batch_bytes=4 * REGION)
        want = bytearray(a)
        vol.start()
        writes = []
        for i in range(40):
            lba = (i * 977) % (size // BS - 16)
            data = fill(8 * BS, 0x10 + i)
            want[lba * BS:(lba + 8) * BS] = data
            writes.append(vol.write(lba, data))
        await asyncio.gather(*writes)
        assert await asyncio.wait_for(vol.wait(), 10) is ResyncState.DONE
        assert bytes(await vol.read(0, size // BS)) == bytes(want)
        assert bytes(await dst.read(0, size // BS)) == bytes(want)
        await src.close()
        await dst.close()

    run(main())


def test_origin_write_during_the_copy_of_a_snapshot_chunk_does_not_reach_the_destination(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copier hands a snapshot chunk still held by the origin to copy_file_range in a thread. A write to that
    chunk can preserve it and land on the origin while the thread copies: the destination must still end up with
    the snapshot's contents (the soak run of 2026-11-26 failed its --verify this way)."""
    from lunsync.snapshots import resync
    from lunsync.snapshots.cow import CowVolume, Pool

    async def main() -> None:
        size = 1 * MiB
        origin = FileBackend.create(tmp_path / "origin.img", size, BS)
        a = pattern(size, 3)
        await origin.write(0, a)
        vol = CowVolume(origin, Pool("p", str(tmp_path / "pool")), 1, REGION, name="lun")
        await vol.hold()
        vol.add_snapshot(1)
        vol.release()
        dst = FileBackend.create(tmp_path / "dst.img", size, BS)
        loop = asyncio.get_running_loop()
        real_copy_all = resync._copy_all
        raced = []

        def copy_all_under_a_write(copies: list[tuple[int, int, int, int]], dst_fd: int) -> None:
            if not raced:  # the first batch: an initiator overwrites chunk 2 while the copy runs
                raced.append(True)
                asyncio.run_coroutine_threadsafe(vol.write(2 * RB, fill(REGION, 0xEE)), loop).result(10)
            real_copy_all(copies, dst_fd)

        monkeypatch.setattr(resync, "_copy_all", copy_all_under_a_write)
        rv = await vol_of(tmp_path, vol.view(1), dst)
        rv.start()
        assert await asyncio.wait_for(rv.wait(), 10) is ResyncState.DONE
        assert raced
        assert bytes(await origin.read(2 * RB, RB)) == fill(REGION, 0xEE)
        assert bytes(await vol.view(1).read(0, size // BS)) == a
        assert bytes(await dst.read(0, size // BS)) == a
        await vol.close()
        await dst.close()

    run(main())


def test_moved_pieces_are_the_runs_that_map_elsewhere() -> None:
    from lunsync.snapshots.resync import moved_pieces

    same = [(5, 4096, 8192)]
    assert moved_pieces(same, same, 4096) == []
    # Origin fd 5 for 200 bytes; then a chunk moved to the pool (fd 7) and one stayed a hole (fd -1 either way).
    before = [(5, 0, 100), (-1, 100, 50), (5, 150, 50)]
    after = [(5, 0, 40), (7, 640, 60), (-1, 100, 50), (-1, 150, 20), (5, 170, 30)]
    assert moved_pieces(before, after, 0) == [(7, 640, 60, 40), (-1, 150, 20, 150)]
    # The same fd at another offset moved too.
    assert moved_pieces([(7, 0, 64)], [(7, 64, 64)], 1024) == [(7, 64, 64, 1024)]

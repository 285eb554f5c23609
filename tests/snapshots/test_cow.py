"""Tests for lunsync.snapshots.cow on real files: snapshot contents, shared copies, deletion in every order, the
crash ordering (injected failures, reopening from disk, and kill -9 of a writer process), pool full, and the resync
API (changed chunks, preserve_range)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from lunsync.snapshots.backend import FileBackend
from lunsync.snapshots.cow import CowVolume, Pool
from lunsync.snapshots.errors import NotReady, ReadOnly

BS = 512
CS = 64 << 10
SIZE = 4 << 20  # 64 chunks


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def make(tmp: Path, *, capacity: int | None = None, epochs: tuple[int, ...] = (), create: bool = True
         ) -> tuple[CowVolume, Pool]:
    path = tmp / "origin.img"
    origin = FileBackend.create(path, SIZE, BS) if create else FileBackend.open(path, BS)
    pool = Pool("p", str(tmp / "pool"), capacity)
    return CowVolume(origin, pool, 1, CS, epochs, name="lun"), pool


def log_records(path: str) -> list[tuple[int, int, int, int]]:
    """A map log's ``(generation, chunk, epoch, slot)`` records, up to the first place that holds none."""
    from lunsync.snapshots import cow

    raw = Path(path).read_bytes()
    out = []
    for off in range(0, len(raw) - cow._LOG_REC.size + 1, cow._LOG_REC.size):
        magic, _, gen, chunk, epoch, slot, *_ = cow._LOG_REC.unpack_from(raw, off)
        if magic != cow._LOG_MAGIC:
            break
        out.append((gen, chunk, epoch, slot))
    return out


F = -1  # cow.FULL: the mask of a copy of a whole chunk


def put(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def pat(byte: int, n: int = CS) -> bytes:
    return bytes([byte]) * n


async def snap(vol: CowVolume, epoch: int) -> None:
    await vol.hold()
    vol.add_snapshot(epoch)
    vol.release()


def test_write_snapshot_write_reads_old_through_view_and_new_on_origin(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0xAA, 4 * CS))
        await snap(vol, 1)
        await vol.write(0, pat(0xBB, 2 * CS))
        view = vol.view(1)
        assert bytes(await view.read(0, 4 * CS // BS)) == pat(0xAA, 4 * CS)
        assert bytes(await vol.read(0, 4 * CS // BS)) == pat(0xBB, 2 * CS) + pat(0xAA, 2 * CS)
        assert vol.slots_used == 2
        assert vol.changed_chunks(1) == {0, 1}
        with pytest.raises(ReadOnly):
            await view.write(0, pat(0, BS))
        await vol.close()

    run(go())


def test_eight_snapshots_share_one_copy_per_chunk(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0x11))
        for e in range(1, 9):
            await snap(vol, e)
        await vol.write(0, pat(0x22))
        await vol.write(0, pat(0x33))  # already preserved for the newest epoch: straight through
        assert vol.slots_used == 1
        assert vol.stats.copies == 1
        for e in range(1, 9):
            assert bytes(await vol.view(e).read(0, CS // BS)) == pat(0x11)
        await vol.close()

    run(go())


def test_partial_chunk_write_preserves_the_whole_chunk(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0x01, CS))
        await snap(vol, 1)
        await vol.write(3, pat(0x02, BS))  # one block in the middle of chunk 0
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x01)
        got = bytes(await vol.read(0, CS // BS))
        assert got[3 * BS:4 * BS] == pat(0x02, BS) and got[:3 * BS] == pat(0x01, 3 * BS)
        await vol.close()

    run(go())


def test_unmap_preserves_first(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0x5A, 2 * CS))
        await snap(vol, 1)
        await vol.unmap([(0, 2 * CS // BS)])
        assert bytes(await vol.read(0, 2 * CS // BS)) == bytes(2 * CS)
        assert bytes(await vol.view(1).read(0, 2 * CS // BS)) == pat(0x5A, 2 * CS)
        await vol.close()

    run(go())


def test_concurrent_writes_to_one_chunk_share_one_preservation(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0x10, CS))
        await snap(vol, 1)
        await asyncio.gather(*(vol.write(i, pat(0x20 + i, BS)) for i in range(32)))
        assert vol.stats.copies == 1
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x10)
        await vol.close()

    run(go())


def test_concurrent_first_writes_are_group_committed(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await snap(vol, 1)
        await asyncio.gather(*(vol.write(c * CS // BS, pat(0x7F, BS)) for c in range(32)))
        assert vol.stats.copies == 32
        assert vol.stats.copy_batches < 32
        await vol.close()

    run(go())


EPOCH_PATTERNS = {1: 0xA1, 2: 0xA2, 3: 0xA3, 4: 0xA4}


async def _history(vol: CowVolume) -> None:
    """Chunk 0 changes before every snapshot, chunk 1 only before the first, chunk 2 before the 3rd."""
    for e, byte in EPOCH_PATTERNS.items():
        await vol.write(0, pat(byte))
        if e == 1:
            await vol.write(CS // BS, pat(byte))
        if e == 3:
            await vol.write(2 * CS // BS, pat(byte))
        await snap(vol, e)
    await vol.write(0, pat(0xFF, 3 * CS))


def _expected(e: int) -> bytes:
    return pat(EPOCH_PATTERNS[e]) + pat(0xA1) + (pat(0xA3) if e >= 3 else bytes(CS))


@pytest.mark.parametrize("order", list(itertools.permutations([1, 2, 3, 4])))
def test_delete_in_every_order_keeps_what_the_rest_need(tmp_path: Path, order: tuple[int, ...]) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)
        await _history(vol)
        live = [1, 2, 3, 4]
        for e in order:
            await vol.hold()
            await vol.drop_snapshot(e)
            vol.release()
            live.remove(e)
            for other in live:
                assert bytes(await vol.view(other).read(0, 3 * CS // BS)) == _expected(other), (order, other)
        assert vol.slots_used == 0
        assert pool.load(1) == []
        assert bytes(await vol.read(0, 3 * CS // BS)) == pat(0xFF, 3 * CS)
        await vol.close()

    run(go())


def test_reopen_from_disk_reads_the_same_snapshots(tmp_path: Path) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)
        await _history(vol)
        await vol.close()
        pool.close()
        vol2, _ = make(tmp_path, epochs=(1, 2, 3, 4), create=False)
        for e in (1, 2, 3, 4):
            assert bytes(await vol2.view(e).read(0, 3 * CS // BS)) == _expected(e)
        # Reopened with snapshot 2 gone (deleted just before a crash): its unshared copies are collected.
        await vol2.close()
        vol3, _ = make(tmp_path, epochs=(1, 3, 4), create=False)
        # Of 6 slots (chunk 2 was a hole before snapshot 3: its copy is a ZERO record and takes none), only chunk
        # 0's copy for (1, 2] served snapshot 2 alone.
        assert vol3.slots_used == 5
        for e in (1, 3, 4):
            assert bytes(await vol3.view(e).read(0, 3 * CS // BS)) == _expected(e)
        await vol3.close()

    run(go())


def test_preservation_is_durable_before_the_origin_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0xAA))
        await snap(vol, 1)
        events: list[str] = []
        real_sync, real_commit, real_pwritev = os.fdatasync, pool.commit, os.pwritev

        def fdatasync(fd: int) -> None:
            maplog = pool._logs.get(1)
            events.append("fdatasync-pool" if fd == vol._data_fd else
                          "fdatasync-map" if maplog is not None and fd == maplog.fd else "fdatasync")
            real_sync(fd)

        def commit(lun_id: int, rows: list[tuple[int, int, int, int]], *args: Any) -> None:
            events.append("commit")
            real_commit(lun_id, rows, *args)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(pool, "commit", commit)
        _fail_origin_writes(vol, monkeypatch, RuntimeError("power cut between preservation and origin write"), events)
        with pytest.raises(RuntimeError):
            await vol.write(0, pat(0xBB))
        # The copy and its map record (one small append to the map log) are flushed together, and both flushes
        # return before the origin is written.
        assert events[0] == "commit" and sorted(events[1:3]) == ["fdatasync-map", "fdatasync-pool"]
        assert events[3:] == ["origin-write"]
        monkeypatch.setattr(os, "pwritev", real_pwritev)
        # Reopen from disk without closing anything: the copy and its map are there.
        vol2, _ = make(tmp_path, epochs=(1,), create=False)
        assert vol2.slots_used == 1
        assert bytes(await vol2.view(1).read(0, CS // BS)) == pat(0xAA)
        await vol2.close()

    run(go())


def test_pool_full_invalidates_the_snapshot_and_keeps_serving(tmp_path: Path) -> None:
    async def go() -> None:
        invalid: list[tuple[list[int], str]] = []
        vol, pool = make(tmp_path, capacity=2 * CS)
        view = vol.view(1)

        async def on_invalid(epochs: list[int], reason: str) -> None:
            invalid.append((epochs, reason))
            view.valid = False

        vol.on_invalid = on_invalid
        await vol.write(0, pat(0x01, 4 * CS))
        await snap(vol, 1)
        await vol.write(0, pat(0x02, 2 * CS))  # fits
        assert invalid == []
        await vol.write(2 * CS // BS, pat(0x03, CS))  # the third copy does not
        assert invalid and invalid[0][0] == [1] and "full" in invalid[0][1]
        assert bytes(await vol.read(0, 3 * CS // BS)) == pat(0x02, 2 * CS) + pat(0x03)
        assert vol.epochs == ()
        with pytest.raises(NotReady):
            await view.read(0, 1)
        copies = vol.stats.copies
        await vol.write(3 * CS // BS, pat(0x04, CS))  # no valid snapshot left: no more copies
        assert vol.stats.copies == copies
        assert pool.free_bytes == 0
        await vol.close()

    run(go())


def test_preserve_range_before_direct_copy(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0x61, 2 * CS))
        await snap(vol, 1)
        await vol.preserve_range(CS // BS, 1)
        os.pwrite(vol.fileno(), pat(0x62, CS), CS)  # what an offloaded copier does
        assert vol.changed_chunks(1) == {1}
        assert bytes(await vol.view(1).read(0, 2 * CS // BS)) == pat(0x61, 2 * CS)
        await vol.close()

    run(go())


# --- kill -9 ---------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, hashlib, json, os, random, signal, sys
    from lunsync.snapshots.backend import FileBackend
    from lunsync.snapshots.cow import CowVolume, Pool
    tmp, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    BS, CS, SIZE = 512, 65536, 4 << 20
    async def main():
        origin = FileBackend.create(os.path.join(tmp, "origin.img"), SIZE, BS)
        vol = CowVolume(origin, Pool("p", os.path.join(tmp, "pool")), 1, CS, name="lun")
        kill_at = rng.randrange(50, 400)
        n = 0
        epoch = 0
        recorded = 0  # the newest epoch whose record is durable (a FUA write may finish during a hold)
        acked = {}
        async def writer(w):
            nonlocal n
            while True:
                lba = rng.randrange(0, SIZE // BS - 16)
                blocks = rng.choice((1, 8, 16))
                data = os.urandom(blocks * BS)
                await vol.write(lba, data, fua=rng.random() < 0.3)
                n += 1
                if n >= kill_at and recorded:  # on a busy machine the writes can outrun the first snapshot
                    os.kill(os.getpid(), signal.SIGKILL)
                await asyncio.sleep(0)
        tasks = [asyncio.create_task(writer(w)) for w in range(4)]
        while True:
            await asyncio.sleep(0.005)
            await vol.hold()
            epoch += 1
            await vol.flush()
            digest = hashlib.sha256(bytes(await origin.read(0, SIZE // BS))).hexdigest()
            # The record is durable before the epoch counts, as the catalog commit is in the daemon.
            record = json.load(open(os.path.join(tmp, "snaps.json"))) if epoch > 1 else {}
            record[str(epoch)] = digest
            with open(os.path.join(tmp, "snaps.json.tmp"), "w") as f:
                json.dump(record, f)
                f.flush(); os.fsync(f.fileno())
            os.replace(os.path.join(tmp, "snaps.json.tmp"), os.path.join(tmp, "snaps.json"))
            vol.add_snapshot(epoch)
            recorded = epoch
            vol.release()
    asyncio.run(main())
""")


@pytest.mark.parametrize("seed", range(5))
def test_kill9_during_writes_leaves_every_snapshot_intact(tmp_path: Path, seed: int) -> None:
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(seed)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    record = json.loads((tmp_path / "snaps.json").read_text()) if (tmp_path / "snaps.json").exists() else {}
    epochs = tuple(int(e) for e in record)

    async def check() -> int:
        vol, _ = make(tmp_path, epochs=epochs, create=False)
        for e, digest in record.items():
            data = bytes(await vol.view(int(e)).read(0, SIZE // BS))
            assert hashlib.sha256(data).hexdigest() == digest, f"snapshot {e} altered (seed {seed})"
        await vol.close()
        return len(record)

    assert record, "the writer died before its first snapshot: the trial checks nothing"
    assert run(check()) == len(epochs)


def test_snapshot_taken_while_a_write_waits_for_its_preservation_keeps_the_old_data(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0xA0))
        await snap(vol, 1)
        writer = asyncio.create_task(vol.write(0, pat(0xB0)))
        while not vol._inflight:  # the write is now waiting for chunk 0's copy for epoch 1
            await asyncio.sleep(0)
        await vol.hold()  # returns at once: nothing has passed its last check
        assert not writer.done()
        vol.add_snapshot(2)
        vol.release()
        await writer
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0xA0)
        assert bytes(await vol.view(2).read(0, CS // BS)) == pat(0xA0)
        assert bytes(await vol.read(0, CS // BS)) == pat(0xB0)
        await vol.close()

    run(go())


def test_a_copy_for_an_epoch_that_never_committed_is_never_taken_for_a_later_snapshot(tmp_path: Path) -> None:
    """A set releases writes before its record commits: a crash in between leaves copies tagged with an epoch the
    catalog never saw. They still serve the older snapshots, and the next snapshot must not reuse that epoch."""

    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0x01))
        await snap(vol, 1)  # committed
        await vol.write(CS // BS, pat(0x02))  # chunk 1 preserved for epoch 1
        await snap(vol, 2)  # never committed: the crash comes first
        await vol.write(0, pat(0x03))  # chunk 0 preserved, tagged 2; it holds snapshot 1's contents too
        await vol.close()
        vol, _ = make(tmp_path, epochs=(1,), create=False)  # restart: the catalog knows epoch 1 only
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x01)
        assert vol.epoch_floor == 2
        with pytest.raises(ValueError):
            vol.add_snapshot(2)
        await snap(vol, vol.epoch_floor + 1)
        await vol.write(0, pat(0x04))
        assert bytes(await vol.view(3).read(0, CS // BS)) == pat(0x03)
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x01)
        await vol.close()

    run(go())


def test_a_hole_is_preserved_as_zero_without_a_slot_or_a_data_sync(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)  # thin: every chunk starts as a hole
        await vol.write(CS // BS, pat(0x01))
        await snap(vol, 1)
        synced: list[int] = []
        real_sync = os.fdatasync

        def fdatasync(fd: int) -> None:
            synced.append(fd)
            real_sync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        await vol.write(0, pat(0x02, 2 * CS))  # chunk 0 was a hole, chunk 1 was data
        assert vol.slots_used == 1 and vol.changed_chunks(1) == {0, 1}
        assert vol.mapped_chunks(1) == 1
        await vol.write(3 * CS // BS, pat(0x03, BS))  # a hole alone: only the map log is synced
        assert vol.slots_used == 1
        assert synced.count(vol._data_fd) == 1 and synced[-1] == pool._logs[1].fd
        want = bytes(CS) + pat(0x01) + bytes(2 * CS)
        assert bytes(await vol.view(1).read(0, 4 * CS // BS)) == want
        # Not closed (a crash): the map log alone brings the ZERO records back.
        vol2, _ = make(tmp_path, epochs=(1,), create=False)
        assert bytes(await vol2.view(1).read(0, 4 * CS // BS)) == want
        await vol2.close()
        await vol.close()

    run(go())


def test_map_log_replays_after_a_crash_and_never_resurrects_a_forgotten_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lunsync.snapshots import cow

    monkeypatch.setattr(cow, "LOG_CHECKPOINT_RECORDS", 3)

    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0x0A, 8 * CS))
        await snap(vol, 1)
        for c in range(5):  # 5 records: one checkpoint after the 3rd, two left in the log
            await vol.write(c * CS // BS, pat(0x0B))
        log_path = pool.log_path(1)
        (gen, *_), *_ = recs = log_records(log_path)  # then the checkpointed generation's 3 records
        assert [(c, e) for g, c, e, _ in recs if g == gen] == [(3, 1), (4, 1)]
        stale = Path(log_path).read_bytes()[:2 * cow._LOG_REC.size]
        rows = Pool("p", str(tmp_path / "pool")).load(1)  # another opener replays (and checkpoints) the log
        assert [(c, e) for c, e, *_ in rows] == [(c, 1) for c in range(5)]
        # A torn record at the log's end (its start: the checkpoint emptied it) is ignored; so are records of an
        # older generation.
        put(log_path, 0, stale + b"\x00torn")
        pool2 = Pool("p", str(tmp_path / "pool"))
        assert [(c, e) for c, e, *_ in pool2.load(1)] == [(c, 1) for c in range(5)]
        pool2.forget(1, [(3, 1), (4, 1)])
        put(log_path, 0, stale)
        assert [(c, e) for c, e, *_ in Pool("p", str(tmp_path / "pool")).load(1)] == [(c, 1) for c in range(3)]
        await vol.close()

    run(go())


def test_map_log_appends_overwrite_its_reserve_and_reopen_stops_at_a_torn_record(tmp_path: Path) -> None:
    from lunsync.snapshots import cow

    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0x0A, 8 * CS))
        await snap(vol, 1)
        log_path = pool.log_path(1)
        sizes = set()
        for c in range(6):
            await vol.write(c * CS // BS, pat(0x0B))
            sizes.add(os.path.getsize(log_path))
        rec = cow._LOG_REC.size
        # The first append made the file a reserve long (written zeros); the others only overwrote it.
        assert len(sizes) == 1 and sizes.pop() >= cow.LOG_CHECKPOINT_RECORDS * rec
        raw = Path(log_path).read_bytes()
        assert [c for _, c, _, _ in log_records(log_path)] == list(range(6)) and not any(raw[6 * rec:])
        # A crash (no close) while records 0-5 were one append in flight: record 0 is torn, the rest reached the
        # disk. Nothing is replayed, and a later append where record 0 was must not join records 1-5 to the log.
        put(log_path, 8, bytes(rec - 8))  # its magic and CRC reached the disk, its body did not
        pool2 = Pool("p", str(tmp_path / "pool"))
        assert pool2.load(1) == []
        pool2.commit(1, [(7, 1, cow.ZERO, cow.FULL)])
        assert [(c, e) for c, e, *_ in Pool("p", str(tmp_path / "pool")).load(1)] == [(7, 1)]
        await vol.close()

    run(go())


def test_a_map_log_append_that_failed_is_never_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lunsync.snapshots import cow

    pool = Pool("p", str(tmp_path / "pool"))
    pool.commit(1, [(0, 1, 0, F)])
    log_ = pool._logs[1]
    gen, rec = log_.gen, cow._LOG_REC.size
    real_sync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if fd == log_.fd:
            raise OSError(5, "Input/output error (injected)")
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(OSError):
        pool.commit(1, [(1, 1, 1, F), (2, 1, 2, F)])
    monkeypatch.setattr(os, "fdatasync", real_sync)
    assert not any(Path(pool.log_path(1)).read_bytes()[rec:3 * rec])  # zeroed after the failure
    # As if the records had reached the disk anyway and the zeros had not.
    lost = b"".join(cow._LOG_MAGIC + cow.zlib.crc32(body).to_bytes(4, "little") + body
                    for body in (cow._LOG_BODY.pack(gen, 1, 1, 1, F, 0, 0, 0, 0, 0),
                                 cow._LOG_BODY.pack(gen, 2, 1, 2, F, 0, 0, 0, 0, 0)))
    put(pool.log_path(1), rec, lost)
    pool.commit(1, [(3, 1, 3, F)])  # in a new generation: what is left of the old one is read no more
    assert log_.gen > gen
    assert Pool("p", str(tmp_path / "pool")).load(1) == [(0, 1, 0, F), (3, 1, 3, F)]


def test_map_log_is_reused_after_a_checkpoint_and_reopens_with_the_new_generation_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lunsync.snapshots import cow

    monkeypatch.setattr(cow, "LOG_CHECKPOINT_RECORDS", 3)
    pool = Pool("p", str(tmp_path / "pool"))
    pool.commit(1, [(0, 1, 0, F), (1, 1, 1, F)])
    pool.commit(1, [(2, 1, 2, F)])  # the 3rd record: checkpointed into pool.db, the log starts again
    size = os.path.getsize(pool.log_path(1))
    pool.commit(1, [(3, 1, 3, F)])
    assert os.path.getsize(pool.log_path(1)) == size  # neither truncated nor grown
    (gen, *_), *older = log_records(pool.log_path(1))
    assert len(older) == 2 and {g for g, *_ in older} == {gen - 1}  # the old generation's tail is still there
    assert Pool("p", str(tmp_path / "pool")).load(1) == [(c, 1, c, F) for c in range(4)]


def test_views_and_volumes_declare_their_copy_capabilities(tmp_path: Path) -> None:
    """The resync copier and the clone fill find where a snapshot's bytes lie through the view's FileExtents, and
    where to write through the volume's CopyTarget, never by looking inside either."""
    from lunsync.snapshots.device import ChangedRegions, CopyTarget, FileExtents

    async def main() -> None:
        vol, _ = make(tmp_path, epochs=(1,))
        await vol.write(0, pat(0x11, 2 * CS))  # chunks 0 and 1 preserved (as holes: the origin was empty)
        view = vol.view(1)
        assert isinstance(vol, CopyTarget) and isinstance(vol, FileExtents)
        assert isinstance(view, FileExtents) and isinstance(view, ChangedRegions)
        assert not isinstance(view, CopyTarget), "a snapshot is never a copy's destination"
        await vol.write(3 * CS // BS, pat(0x22, 512))  # chunk 3: also a hole when preserved
        await vol.hold()
        vol.add_snapshot(2)
        vol.release()
        await vol.write(0, pat(0x33, 512))  # chunk 0 now has data, preserved for snapshot 2 in a pool slot
        ext = vol.view(2).file_extents(0, 2 * CS // BS)
        # Chunk 0's first unit from the pool file (a 4 KiB unit is what the write needed), the rest of it and chunk
        # 1 still the origin's (data written there).
        assert ext[0][0] not in (-1, vol.origin.fileno()) and ext[0][2] == 4096
        assert ext[1] == (vol.origin.fileno(), 4096, 2 * CS - 4096)
        assert [e[0] for e in view.file_extents(0, 4 * CS // BS)] == [-1]  # epoch 1 saw only holes (thin)
        assert view.changed_regions(CS) == {0, 1, 3}
        assert view.changed_regions(2 * CS) == {0, 1}  # regions of two chunks
        assert view.changed_regions(CS // 2) == {0, 1, 2, 3, 6, 7}  # half chunks
        dfd = await vol.begin_copy(4 * CS // BS, CS // BS)  # preserves chunk 4 for the snapshots first
        assert dfd == vol.origin.fileno() and vol.pieces(4, 1) != [(0, CS, None)]
        await vol.close()

    run(main())


# --- copies per 4 KiB unit of a chunk --------------------------------------------------------------------------


U = 4096  # the copy unit of a 64 KiB chunk


def test_a_4k_first_write_copies_4k_and_a_later_one_in_the_chunk_copies_its_own_block(tmp_path: Path) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)
        assert vol.unit == U
        await vol.write(0, pat(0x0A, 2 * CS))
        await snap(vol, 1)
        await vol.write(U // BS, pat(0x0B, U))  # unit 1 of chunk 0
        slot_file = pool.data_path(1)
        assert os.stat(slot_file).st_blocks * 512 == U  # one unit copied, not the chunk
        assert vol.pieces(0, 1) == [(0, U, None), (U, U, 0), (2 * U, CS - 2 * U, None)]
        await vol.write(5 * U // BS, pat(0x0C, 2 * U))  # units 5-6 of the same chunk: the same slot grows
        assert os.stat(slot_file).st_blocks * 512 == 3 * U
        await vol.write(U // BS, pat(0x0D, U))  # unit 1 again: preserved already, nothing copied
        assert os.stat(slot_file).st_blocks * 512 == 3 * U and vol.slots_used == 1
        assert bytes(await vol.view(1).read(0, 2 * CS // BS)) == pat(0x0A, 2 * CS)
        want = pat(0x0A, U) + pat(0x0D, U) + pat(0x0A, 3 * U) + pat(0x0C, 2 * U) + pat(0x0A, CS - 7 * U)
        assert bytes(await vol.origin.read(0, CS // BS)) == want
        await vol.close()
        pool.close()
        vol2, pool2 = make(tmp_path, epochs=(1,), create=False)  # the masks are durable
        assert bytes(await vol2.view(1).read(0, 2 * CS // BS)) == pat(0x0A, 2 * CS)
        await vol2.write(9 * U // BS, pat(0x0E, U))
        assert bytes(await vol2.view(1).read(0, CS // BS)) == pat(0x0A, CS)
        await vol2.close()
        pool2.close()

    run(go())


def _on_origin(path: Path, offset: int, n: int) -> bytes:
    """What the origin file holds now (its page cache, read through a descriptor of its own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def test_a_write_over_preserved_units_lands_in_the_call(tmp_path: Path) -> None:
    """Once its units are preserved (or with no snapshot at all) a write lands in the call itself, through the
    origin's inline write, before its coroutine is awaited. A write that must preserve, one over a unit not yet
    copied, and a held one do not."""
    async def go() -> None:
        path = tmp_path / "origin.img"
        vol = CowVolume(FileBackend.create(path, SIZE, BS), Pool("p", str(tmp_path / "pool")), 1, CS, name="lun")

        def landed_in_call(lba: int, data: bytes, at: int, expect: bytes) -> bool:
            coro = vol.write(lba, data)
            was = _on_origin(path, at, len(expect)) == expect
            coro.close()
            return was

        assert landed_in_call(0, pat(0x01, U), 0, pat(0x01, U))  # no snapshot
        await vol.write(0, pat(0x0A, CS))
        await snap(vol, 1)
        assert not landed_in_call(0, pat(0x0B, U), 0, pat(0x0B, U))  # a first write preserves
        await vol.write(0, pat(0x0B, U))
        assert landed_in_call(0, pat(0x0C, U), 0, pat(0x0C, U))  # unit 0 is preserved
        assert not landed_in_call(U // BS, pat(0x0C, U), U, pat(0x0C, U))  # unit 1 is not
        assert not landed_in_call(0, pat(0x0D, 2 * U), 0, pat(0x0D, U))
        await vol.hold()
        assert not landed_in_call(0, pat(0x0E, U), 0, pat(0x0E, U))  # a held write waits
        vol.release()
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x0A, CS)
        await vol.close()

    run(go())


def test_a_write_landing_on_the_origins_threads_is_in_the_snapshot_without_holding_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An origin whose writes go to its threads (a store that may hang, or for a while after a stalled write) yields
    before its data lands. Such a write passed its check, so the hold need not wait for it (after a stall 64 of them
    held a set's writes for tens of milliseconds): the snapshot taken meanwhile contains it. What must wait is what
    would see its blocks before it lands: the snapshot's readers, and the copy a later write makes of those blocks
    for the new snapshot (copied early, it would hold the old data and the snapshot would change under its reader;
    the kill -9 trials caught that on a loaded machine when the hold did not count such writes at all)."""
    import threading

    async def go() -> None:
        vol, _ = make(tmp_path)
        await vol.write(0, pat(0x0A, CS))
        await snap(vol, 1)
        await vol.write(0, pat(0x0B, U))  # unit 0 now preserved for snapshot 1: the next write needs no copy
        fd = vol.fileno()
        entered, go_on = threading.Event(), threading.Event()
        real = os.pwritev

        def pwritev(f: int, bufs: Any, offset: int, *a: Any) -> int:
            if f == fd and threading.current_thread() is not threading.main_thread():
                entered.set()
                go_on.wait(10)
            return real(f, bufs, offset, *a)

        monkeypatch.setattr(os, "pwritev", pwritev)
        vol.origin._offload_writes = True  # type: ignore[attr-defined]
        writer = asyncio.create_task(vol.write(0, pat(0x0C, U)))
        assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        assert vol.hold_nowait(), "the hold waited for a write that had passed its check"
        vol.add_snapshot(2)
        vol.release()
        assert not vol.settled(2)
        reader = asyncio.create_task(vol.view(2).read(0, U // BS))
        with pytest.raises(NotReady):
            vol.view(2).file_extents(0, U // BS)
        monkeypatch.setattr(os, "pwritev", real)
        vol.origin._offload_writes = False  # type: ignore[attr-defined]
        later = asyncio.create_task(vol.write(0, pat(0x0D, U)))  # needs a copy of unit 0 for snapshot 2
        await asyncio.sleep(0.2)
        assert not reader.done() and not later.done(), "snapshot 2 was read or copied before its write landed"
        go_on.set()
        await writer
        await later
        assert vol.settled(2)
        assert bytes(await reader) == pat(0x0C, U)
        assert bytes(await vol.view(2).read(0, U // BS)) == pat(0x0C, U)
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x0A, CS)
        assert bytes(await vol.read(0, U // BS)) == pat(0x0D, U)
        await vol.close()

    run(go())


def test_a_sequential_write_over_whole_chunks_is_copied_as_one_extent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first write over 4 whole chunks copies them in one preadv and one pwritev (new slots in chunk order, so
    the chunks lie in a run of slots), with one CRC-checked map record per chunk that a reopen accepts."""
    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0xAA, 8 * CS))
        await snap(vol, 1)
        calls: list[tuple[str, int, int]] = []
        real_preadv, real_pwritev = os.preadv, os.pwritev

        def preadv(fd: int, bufs: Any, offset: int, *a: Any) -> int:
            calls.append(("r", fd, sum(len(memoryview(b)) for b in bufs)))
            return real_preadv(fd, bufs, offset, *a)

        def pwritev(fd: int, bufs: Any, offset: int, *a: Any) -> int:
            calls.append(("w", fd, sum(len(memoryview(b)) for b in bufs)))
            return real_pwritev(fd, bufs, offset, *a)

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "pwritev", pwritev)
        await vol.write(2 * CS // BS, pat(0xBB, 4 * CS))
        monkeypatch.undo()
        src = vol.origin.fileno()
        assert [c for c in calls if c[1] == src and c[0] == "r"] == [("r", src, 4 * CS)]
        assert [c for c in calls if c[1] == vol._data_fd] == [("w", vol._data_fd, 4 * CS)]
        # Packed: each chunk's units in the blocks right after the previous chunk's (one append).
        from lunsync.snapshots import cow
        units = CS // vol.unit
        assert [cow.PACKED - s for _, _, _, s in log_records(pool.log_path(1))] == [0, units, 2 * units, 3 * units]
        await vol.close()
        pool.close()
        vol2, pool2 = make(tmp_path, epochs=(1,), create=False)
        assert vol2.slots_used == 4
        assert bytes(await vol2.view(1).read(0, 8 * CS // BS)) == pat(0xAA, 8 * CS)
        assert bytes(await vol2.read(0, 8 * CS // BS)) == pat(0xAA, 2 * CS) + pat(0xBB, 4 * CS) + pat(0xAA, 2 * CS)
        await vol2.close()
        pool2.close()

    run(go())


def test_a_snapshot_reads_a_unit_from_a_later_copy_and_keeps_it_when_that_snapshot_goes(tmp_path: Path) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0x01, CS))
        await snap(vol, 1)
        await vol.write(0, pat(0x02, U))  # unit 0: copy for epoch 1 holds it
        await snap(vol, 2)
        await vol.write(U // BS, pat(0x03, U))  # unit 1, untouched since snapshot 1: copy for epoch 2 holds it
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x01, CS)
        assert bytes(await vol.view(2).read(0, CS // BS)) == pat(0x02, U) + pat(0x01, CS - U)
        await vol.hold()
        try:
            await vol.drop_snapshot(2)  # snapshot 1 still reads unit 1 from epoch 2's copy: it must stay
        finally:
            vol.release()
        assert vol.slots_used == 2
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x01, CS)
        await vol.close()
        pool.close()
        vol2, pool2 = make(tmp_path, epochs=(1,), create=False)  # reopening frees nothing snapshot 1 reads
        assert vol2.slots_used == 2 and bytes(await vol2.view(1).read(0, CS // BS)) == pat(0x01, CS)
        await vol2.hold()
        try:
            assert await vol2.drop_snapshot(1) == 2
        finally:
            vol2.release()
        await vol2.close()
        pool2.close()

    run(go())


def test_concurrent_first_writes_to_units_of_one_chunk_share_a_batch(tmp_path: Path) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0x21, CS))
        await snap(vol, 1)
        await asyncio.gather(*(vol.write(u * U // BS, pat(0x30 + u, U)) for u in range(16)))
        assert vol.slots_used == 1 and vol.pieces(0, 1) == [(0, CS, 0)]  # every unit: a whole-chunk copy now
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0x21, CS)
        assert bytes(await vol.origin.read(0, CS // BS)) == b"".join(pat(0x30 + u, U) for u in range(16))
        await vol.close()
        pool.close()

    run(go())


def test_a_map_log_of_the_first_format_is_replayed_as_whole_chunk_copies(tmp_path: Path) -> None:
    from lunsync.snapshots import cow

    pool = Pool("p", str(tmp_path / "pool"))
    pool.checkpoint(1)
    pool.close()
    gen = 0
    old = b"".join(cow._LOG1_MAGIC + cow.zlib.crc32(body).to_bytes(4, "little") + body
                   for body in (cow._LOG1_BODY.pack(gen, 3, 1, 0), cow._LOG1_BODY.pack(gen, 4, 1, cow.ZERO)))
    Path(pool.log_path(1)).write_bytes(old + bytes(4096))
    pool2 = Pool("p", str(tmp_path / "pool"))
    assert pool2.load(1) == [(3, 1, 0, F), (4, 1, cow.ZERO, F)]
    pool2.commit(1, [(5, 1, 1, 0b10)])  # in the new format, in a new generation
    pool2.close()
    assert Pool("p", str(tmp_path / "pool")).load(1) == [(3, 1, 0, F), (4, 1, cow.ZERO, F), (5, 1, 1, 0b10)]


def test_a_map_log_of_the_second_format_still_loads(tmp_path: Path) -> None:
    from lunsync.snapshots import cow

    pool = Pool("p", str(tmp_path / "pool"))
    pool.checkpoint(1)
    pool.close()
    gen = 0
    old = b"".join(cow._LOG2_MAGIC + cow.zlib.crc32(body).to_bytes(4, "little") + body
                   for body in (cow._LOG2_BODY.pack(gen, 3, 1, 0, 0b101), cow._LOG2_BODY.pack(gen, 4, 1, cow.ZERO, F)))
    # Records of the second format carry no CRC of their data: nothing to check them against, none dropped.
    Path(pool.log_path(1)).write_bytes(old + bytes(4096))
    pool2 = Pool("p", str(tmp_path / "pool"))
    assert pool2.load(1) == [(3, 1, 0, 0b101), (4, 1, cow.ZERO, F)]
    pool2.commit(1, [(5, 1, 1, 0b10)])  # in the current format, in a new generation
    pool2.close()
    assert Pool("p", str(tmp_path / "pool")).load(1) == [(3, 1, 0, 0b101), (4, 1, cow.ZERO, F), (5, 1, 1, 0b10)]


def _fail_origin_writes(vol: CowVolume, monkeypatch: pytest.MonkeyPatch, error: BaseException,
                        events: list[str] | None = None) -> None:
    """Make every write to the volume's origin file raise ``error`` at the syscall (``os.pwritev`` on the origin's
    descriptor; the pool's own writes pass), noting each in ``events``. The syscall, not the origin's method: the
    backend may be a compiled class, whose methods cannot be replaced on an instance."""
    fd, real = vol.origin.fileno(), os.pwritev

    def pwritev(f: int, buffers: Any, offset: int, *flags: int) -> int:
        if f != fd:
            return real(f, buffers, offset, *flags)
        if events is not None:
            events.append("origin-write")
        raise error

    monkeypatch.setattr(os, "pwritev", pwritev)


def _cut_before_origin(vol: CowVolume, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the volume's next origin write fail, as a power cut right after the preservation's flushes would."""
    _fail_origin_writes(vol, monkeypatch, RuntimeError("power cut between preservation and origin write"))


def test_a_torn_slot_write_is_detected_at_open_and_the_chunk_is_not_preserved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    U = 4096  # the unit of a 64 KiB chunk

    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0xAA, 2 * CS))
        await snap(vol, 1)
        _cut_before_origin(vol, monkeypatch)
        with pytest.raises(RuntimeError):
            await vol.write(0, pat(0xBB, U))  # unit 0 of chunk 0 is preserved, the origin write is cut
        with pytest.raises(RuntimeError):
            await vol.write(CS // BS, pat(0xCC, U))  # and unit 0 of chunk 1
        assert vol.slots_used == 2
        place = vol.pieces(1, 1)[0][2]  # where chunk 1's unit 0 was copied in the pool file
        assert vol.pieces(1, 1)[0][:2] == (0, U) and place is not None and place >= 0
        # The power cut kept chunk 1's map record but not its copy: its place holds something else.
        put(pool.data_path(1), place, pat(0x5A, U // 2))
        vol2, pool2 = make(tmp_path, epochs=(1,), create=False)
        assert vol2.slots_used == 1 and set(vol2._copies) == {0}
        assert pool2._logs[1].stale_tail is False  # the open's checkpoint started a new generation
        # The snapshot still reads right: chunk 0 from its copy, chunk 1 from the origin, never overwritten.
        assert bytes(await vol2.view(1).read(0, 2 * CS // BS)) == pat(0xAA, 2 * CS)
        # Written again, chunk 1 is preserved again, and a later open keeps it.
        await vol2.write(CS // BS, pat(0xCC, U))
        assert bytes(await vol2.view(1).read(0, 2 * CS // BS)) == pat(0xAA, 2 * CS)
        vol3, _ = make(tmp_path, epochs=(1,), create=False)
        assert vol3.slots_used == 2
        assert bytes(await vol3.view(1).read(0, 2 * CS // BS)) == pat(0xAA, 2 * CS)
        await vol3.close()

    run(go())


def test_a_torn_write_of_more_units_drops_only_those_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    U = 4096

    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0xAA, CS))
        await snap(vol, 1)
        await vol.write(0, pat(0xBB, U))  # unit 0 preserved and overwritten
        _cut_before_origin(vol, monkeypatch)
        with pytest.raises(RuntimeError):
            await vol.write(3 * U // BS, pat(0xCC, U))  # unit 3 joins the same copy; the origin write is cut
        where = {off: src for off, _, src in vol.pieces(0, 1)}
        assert vol.pieces(0, 1)[0][:2] == (0, U) and where[0] is not None and where[3 * U] is not None
        put(pool.data_path(1), where[3 * U] + 100, b"\x00torn")  # unit 3's copy, wherever its batch put it
        vol2, _ = make(tmp_path, epochs=(1,), create=False)
        assert vol2.slots_used == 1 and vol2._masks[(0, 1)] == 0b1  # unit 0 only: unit 3 is still the origin's
        assert bytes(await vol2.view(1).read(0, CS // BS)) == pat(0xAA, CS)
        await vol2.close()

    run(go())


def test_the_copy_and_its_map_record_are_flushed_at_the_same_time(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0xAA))
        await snap(vol, 1)
        real_sync = os.fdatasync
        log_started = threading.Event()
        overlapped: list[bool] = []

        def fdatasync(fd: int) -> None:
            maplog = pool._logs.get(1)
            if maplog is not None and fd == maplog.fd:
                log_started.set()
            elif fd == vol._data_fd:
                # Serial flushes would leave the map log's unstarted until this one returned.
                overlapped.append(log_started.wait(10))
            real_sync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        await vol.write(0, pat(0xBB, BS))
        assert overlapped == [True]
        await vol.close()

    run(go())


def test_a_batch_of_more_than_a_mebibyte_flushes_its_copies_before_their_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 1 MiB of copies a batch copies whole chunks with copy_file_range, syncs the slot file, then appends
    records without a CRC (nothing to check at open: the copy was durable first), which a reopen keeps."""
    from lunsync.snapshots import cow

    async def go() -> None:
        vol, pool = make(tmp_path)
        n = cow._CRC_MAX_BYTES // CS + 2  # chunks: just past the bound
        await vol.write(0, pat(0xAA, n * CS))
        await snap(vol, 1)
        maplog = pool._log(1)
        real_sync, real_append = os.fdatasync, maplog.append
        order: list[str] = []

        def fdatasync(fd: int) -> None:
            order.append("log" if pool._logs.get(1) is not None and fd == pool._logs[1].fd else
                         "slots" if fd == vol._data_fd else "other")
            real_sync(fd)

        def append(rows: Any, proofs: Any, alongside: Any) -> None:
            order.append("append")
            assert alongside is None and all(p[0] == 0 for p in proofs)
            real_append(rows, proofs, alongside)

        real_cfr, real_pwritev = os.copy_file_range, os.pwritev
        offloaded: list[int] = []
        written: list[int] = []

        def copy_file_range(src: int, dst: int, count: int, *a: Any) -> int:
            offloaded.append(dst)
            return real_cfr(src, dst, count, *a)

        def pwritev(fd: int, *a: Any) -> int:
            written.append(fd)
            return real_pwritev(fd, *a)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(maplog, "append", append)
        await vol.write(0, pat(0xBB, n * CS))
        monkeypatch.undo()
        assert order == ["slots", "append", "log"]
        # Whole chunks in a run of slots: copied by the kernel, in extents of at most 1 MiB, nothing through a buffer
        assert len(offloaded) >= 2 and set(offloaded) == {vol._data_fd} and vol._data_fd not in written
        raw = Path(pool.log_path(1)).read_bytes()
        copied = [cow._LOG_REC.unpack_from(raw, off)[7] for off in range(0, n * cow._LOG_REC.size, cow._LOG_REC.size)]
        assert copied == [0] * n
        vol2, pool2 = make(tmp_path, epochs=(1,), create=False)
        assert vol2.slots_used == n
        await vol2.close()
        pool2.close()

    run(go())


def test_a_failed_slot_sync_retracts_its_map_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        invalid: list[list[int]] = []
        vol, pool = make(tmp_path)

        async def on_invalid(epochs: list[int], reason: str) -> None:
            invalid.append(epochs)

        vol.on_invalid = on_invalid
        await vol.write(0, pat(0xAA))
        await snap(vol, 1)
        real_sync = os.fdatasync

        def fdatasync(fd: int) -> None:
            if fd == vol._data_fd:
                raise OSError(5, "Input/output error (injected)")
            real_sync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        await vol.write(0, pat(0xBB, BS))  # the origin keeps serving; the snapshot is lost
        monkeypatch.setattr(os, "fdatasync", real_sync)
        assert invalid == [[1]] and vol.slots_used == 0
        assert pool._logs[1].stale_tail and not any(Path(pool.log_path(1)).read_bytes()[:4096])
        assert bytes(await vol.origin.read(0, 1)) == pat(0xBB, BS)
        await vol.close()

    run(go())


def test_a_pool_db_made_before_masks_gets_the_column_and_its_copies_are_whole(tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "pool").mkdir()
    db = sqlite3.connect(tmp_path / "pool" / "pool.db")
    db.execute("CREATE TABLE copies (lun_id INTEGER NOT NULL, chunk INTEGER NOT NULL, epoch INTEGER NOT NULL, slot "
               "INTEGER NOT NULL, PRIMARY KEY (lun_id, chunk, epoch), UNIQUE (lun_id, slot)) WITHOUT ROWID")
    db.execute("INSERT INTO copies VALUES (1, 2, 1, 0)")
    db.commit()
    db.close()
    pool = Pool("p", str(tmp_path / "pool"))
    assert pool.load(1) == [(2, 1, 0, F)]
    pool.commit(1, [(2, 1, 0, 0b1), (6, 1, 1, 0b1)])  # a record of a whole copy's units leaves it whole
    pool.checkpoint(1)
    assert pool.load(1) == [(2, 1, 0, F), (6, 1, 1, 0b1)]
    pool.close()


def test_units_still_preserve_for_an_older_snapshot_after_a_newer_one_with_partial_copies_goes(
        tmp_path: Path) -> None:
    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0x41, CS))  # chunk 0 holds data; chunk 1 stays a hole
        await snap(vol, 1)
        await snap(vol, 2)
        await vol.write(0, pat(0x42, U))  # unit 0 of each chunk: copies for epoch 2
        await vol.write(CS // BS, pat(0x43, U))
        await vol.hold()
        try:
            await vol.drop_snapshot(2)  # the copies stay: snapshot 1 reads unit 0 from them
        finally:
            vol.release()
        # Epoch 1 is the newest again and its units 1.. were never preserved: these writes must copy them (into a
        # copy for epoch 1, before epoch 2's), not loop for ever nor skip it.
        await asyncio.wait_for(vol.write(U // BS, pat(0x44, U)), 10)
        await asyncio.wait_for(vol.write((CS + U) // BS, pat(0x45, U)), 10)
        assert bytes(await vol.view(1).read(0, 2 * CS // BS)) == pat(0x41, CS) + bytes(CS)
        await vol.close()
        pool.close()
        vol2, pool2 = make(tmp_path, epochs=(1,), create=False)
        assert bytes(await vol2.view(1).read(0, 2 * CS // BS)) == pat(0x41, CS) + bytes(CS)
        await vol2.close()
        pool2.close()

    run(go())


# --- write-back staging (WCE=1 first writes) --------------------------------------------------------------------


def test_inline_write_reaches_the_origin_only_when_the_volume_has_nothing_to_do_first(tmp_path: Path) -> None:
    async def go() -> None:
        vol, _ = make(tmp_path)
        assert vol.write_inline(0, pat(0xA1)) is True  # no snapshot: straight to the origin
        assert bytes(await vol.origin.read(0, CS // BS)) == pat(0xA1)
        await snap(vol, 1)
        # Chunk 0's first write since the snapshot needs its copy: declined, nothing written.
        assert vol.write_inline(0, pat(0xB2, 4096)) is False
        assert bytes(await vol.origin.read(0, CS // BS)) == pat(0xA1)
        await vol.write(0, pat(0xB2, 4096))  # preserves that unit, then writes
        assert vol.write_inline(0, pat(0xC3, 4096)) is True  # that unit is preserved already
        assert vol.write_inline(8, pat(0xC3, 4096)) is False  # the next unit is not
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0xA1)
        assert bytes(await vol.read(0, 8)) == pat(0xC3, 4096)
        # While a hold is up (a snapshot set fixing its point in time), nothing lands inline.
        assert vol.hold_nowait()
        assert vol.write_inline(0, pat(0xD4, 4096)) is False
        vol.release()
        # Nor while a staged write has not reached the origin: writes land in staging order.
        vol.staging_bytes = 1 << 20
        await vol.write(CS // BS, pat(0xE5, 4096))  # chunk 1's first write since the snapshot: staged
        assert vol.stats.staged_writes == 1
        assert vol.write_inline(0, pat(0xD4, 4096)) is False
        await vol.flush()
        assert vol.write_inline(0, pat(0xD4, 4096)) is True
        assert bytes(await vol.read(0, 8)) == pat(0xD4, 4096)
        assert bytes(await vol.view(1).read(0, 2 * CS // BS)) == pat(0xA1) + bytes(CS)
        await vol.close()

    run(go())


def staged(tmp: Path, staging: int = 1 << 20, **kw: object) -> tuple[CowVolume, Pool]:
    vol, pool = make(tmp, **kw)  # type: ignore[arg-type]
    vol.staging_bytes = staging
    return vol, pool


class CopyGate:
    """Holds every preservation batch's copy (in its thread) until opened: what a slow pool looks like."""

    def __init__(self, vol: CowVolume, monkeypatch: pytest.MonkeyPatch) -> None:
        import threading

        self.open = threading.Event()
        self.batches = 0
        real = vol._copy_and_commit

        def copy_and_commit(*args: object) -> object:
            self.batches += 1
            self.open.wait(30)
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(vol, "_copy_and_commit", copy_and_commit)


def on_file(vol: CowVolume, lba: int, n: int) -> bytes:
    return os.pread(vol.origin.fileno(), n, lba * BS)


async def spin(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0.001)


def test_a_staged_first_write_is_answered_before_its_copy_is_durable_and_reads_back_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        vol, _ = staged(tmp_path)
        await vol.write(0, pat(0xA1))
        await snap(vol, 1)
        gate = CopyGate(vol, monkeypatch)
        await asyncio.wait_for(vol.write(8, pat(0xB1, 4096)), 5)  # answered while the copy is held
        assert vol.staged == 1 and vol.stats.staged_writes == 1 and gate.batches == 1
        assert on_file(vol, 8, 4096) == pat(0xA1, 4096)  # the origin still holds what the copy will take
        assert bytes(await vol.read(0, CS // BS)) == pat(0xA1, 4096) + pat(0xB1, 4096) + pat(0xA1, CS - 8192)
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0xA1)
        flush = asyncio.create_task(vol.flush())
        await spin()
        assert not flush.done()  # SYNCHRONIZE CACHE waits for the batch and the landing
        gate.open.set()
        await flush
        assert vol.staged == 0 and vol.stats.staged_bytes == 0
        assert on_file(vol, 8, 4096) == pat(0xB1, 4096)
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0xA1)
        await vol.close()

    run(go())


def test_writes_over_a_staged_one_keep_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        vol, _ = staged(tmp_path)
        await vol.write(0, pat(0xA2))
        await snap(vol, 1)
        gate = CopyGate(vol, monkeypatch)
        await vol.write(0, pat(0xB2, 4096))
        await vol.write(4, pat(0xC2, 4096))  # overlaps the staged one: staged behind it, though it needs no copy
        assert vol.staged == 2
        assert bytes(await vol.read(0, 12)) == pat(0xB2, 2048) + pat(0xC2, 4096)
        fua = asyncio.create_task(vol.write(2, pat(0xD2, 512), fua=True))  # FUA: after every staged write
        await spin()
        assert not fua.done()
        gate.open.set()
        await fua
        assert on_file(vol, 0, 6144) == pat(0xB2, 1024) + pat(0xD2, 512) + pat(0xB2, 512) + pat(0xC2, 4096)
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0xA2)
        await vol.close()

    run(go())


def test_a_full_staging_area_makes_writes_wait_not_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        vol, _ = staged(tmp_path, staging=2 * 4096)
        await vol.write(0, pat(0xA3, 4 * CS))
        await snap(vol, 1)
        gate = CopyGate(vol, monkeypatch)
        await vol.write(0, pat(0xB3, 4096))
        await vol.write(CS // BS, pat(0xB3, 4096))
        third = asyncio.create_task(vol.write(2 * CS // BS, pat(0xB3, 4096)))
        await spin()
        assert not third.done() and vol.stats.stage_waits == 1 and vol.stats.staged_bytes == 2 * 4096
        gate.open.set()
        await third
        await vol.flush()
        for c in range(3):
            assert on_file(vol, c * CS // BS, 4096) == pat(0xB3, 4096)
        assert bytes(await vol.view(1).read(0, 4 * CS // BS)) == pat(0xA3, 4 * CS)
        await vol.close()

    run(go())


def test_a_hold_lands_staged_writes_so_a_snapshot_includes_them(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        vol, _ = staged(tmp_path)
        await vol.write(0, pat(0xA4))
        await snap(vol, 1)
        gate = CopyGate(vol, monkeypatch)
        await vol.write(0, pat(0xB4, 4096))
        assert not vol.hold_nowait()  # a staged write is in flight for a hold
        drain = asyncio.create_task(vol.drain())
        await spin()
        assert not drain.done()
        gate.open.set()
        await drain
        vol.add_snapshot(2)
        vol.release()
        await vol.write(0, pat(0xC4))
        await vol.flush()
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0xA4)
        assert bytes(await vol.view(2).read(0, CS // BS)) == pat(0xB4, 4096) + pat(0xA4, CS - 4096)
        assert bytes(await vol.read(0, CS // BS)) == pat(0xC4)
        await vol.close()

    run(go())


def test_paused_staging_writes_through_and_unmap_lands_staged_writes_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        vol, _ = staged(tmp_path)
        await vol.write(0, pat(0xA5, 2 * CS))
        await snap(vol, 1)
        gate = CopyGate(vol, monkeypatch)
        await vol.write(0, pat(0xB5, 4096))
        unmap = asyncio.create_task(vol.unmap([(0, 8)]))
        vol.pause_staging()
        direct = asyncio.create_task(vol.write(CS // BS, pat(0xC5, 4096)))
        await spin()
        assert not unmap.done() and not direct.done() and vol.staged == 1  # neither staged nor written yet
        gate.open.set()
        await asyncio.gather(unmap, direct, vol.land_staged())
        vol.resume_staging()
        assert on_file(vol, 0, 4096) == bytes(4096)  # the unmap came after the staged write
        assert on_file(vol, CS // BS, 4096) == pat(0xC5, 4096)
        assert bytes(await vol.view(1).read(0, 2 * CS // BS)) == pat(0xA5, 2 * CS)
        await vol.close()

    run(go())


def test_a_staged_write_whose_copy_fails_invalidates_the_snapshot_and_still_lands(tmp_path: Path) -> None:
    async def go() -> None:
        invalid: list[list[int]] = []
        vol, _ = staged(tmp_path, capacity=4096)  # room for one unit's copy

        async def on_invalid(epochs: list[int], reason: str) -> None:
            invalid.append(epochs)

        vol.on_invalid = on_invalid
        await vol.write(0, pat(0xA6, 2 * CS))
        await snap(vol, 1)
        await vol.write(0, pat(0xB6, 4096))
        await vol.write(CS // BS, pat(0xB6, 4096))  # its unit does not fit in the pool
        await vol.flush()
        assert invalid == [[1]] and vol.epochs == ()
        assert on_file(vol, 0, 4096) == on_file(vol, CS // BS, 4096) == pat(0xB6, 4096)
        await vol.close()

    run(go())


def test_a_staged_write_that_cannot_reach_the_origin_fails_the_next_flush(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lunsync.snapshots.errors import MediumError

    async def go() -> None:
        vol, _ = staged(tmp_path)
        await vol.write(0, pat(0xA7))
        await snap(vol, 1)

        _fail_origin_writes(vol, monkeypatch, OSError(errno.EIO, "EIO writing the origin"))  # a MediumError
        await vol.write(0, pat(0xB7, 4096))  # answered from the staging area
        with pytest.raises(MediumError):
            await vol.flush()
        await vol.flush()  # reported once, as fsync reports a lost write-back
        assert bytes(await vol.view(1).read(0, CS // BS)) == pat(0xA7)
        await vol.close()

    run(go())


def test_the_geometry_follows_a_resize_and_a_reopen(tmp_path: Path) -> None:
    # The volume keeps its origin's geometry in attributes: a resize and a reopen with other flags must carry over.
    async def go() -> None:
        vol, _ = make(tmp_path)
        assert (vol.block_size, vol.num_blocks, vol.read_only) == (BS, SIZE // BS, False)
        await vol.resize(2 * SIZE // BS)
        assert vol.num_blocks == 2 * SIZE // BS
        await vol.write(2 * SIZE // BS - 8, pat(0xC1, 8 * BS))  # the grown tail is writable at once
        old = vol.origin
        await old.close()
        vol.reopen(FileBackend.open(tmp_path / "origin.img", BS, read_only=True))
        assert (vol.num_blocks, vol.read_only) == (2 * SIZE // BS, True)
        assert not vol.write_inline(0, pat(0xC2, BS))  # the read-only origin answers it now, not the closed one
        with pytest.raises(ReadOnly):
            await vol.write(0, pat(0xC2, BS))
        assert bytes(await vol.read(2 * SIZE // BS - 8, 8)) == pat(0xC1, 8 * BS)
        await vol.close()

    run(go())


@pytest.mark.parametrize("state", ["closed", "crashed"])
def test_a_pool_of_the_older_slot_layout_opens_reads_grows_and_frees(tmp_path: Path, state: str) -> None:
    """Pools written by the code before packed copies (see data/make_old_layout_pools.py): one stopped cleanly, one
    as a kill -9 left it (its rows in an LSM3 map log). Their copies read where their slots are; more units of an
    old copy go into its slot, new copies are packed after the old slots, and deleting the snapshots frees it all."""
    import tarfile

    U, ocs, osize = 4096, 64 << 10, 512 << 10
    with tarfile.open(Path(__file__).parent / "data" / "old-layout-pools.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    d = tmp_path / state
    orig = [bytes([0x10 + c]) * ocs for c in range(osize // ocs)]
    first = b"".join(orig)
    second = bytearray(first)
    second[0:U] = b"\xb0" * U
    second[2 * ocs:3 * ocs] = b"\xb2" * ocs
    second[3 * ocs + 5 * U:3 * ocs + 6 * U] = b"\xb3" * U

    def open_vol() -> tuple[CowVolume, Pool]:
        pool = Pool("p", str(d / "pool"))
        return CowVolume(FileBackend.open(d / "origin.img", BS), pool, 1, ocs, (1, 2), name="lun"), pool

    async def check(vol: CowVolume) -> None:
        assert bytes(await vol.view(1).read(0, osize // BS)) == first
        assert bytes(await vol.view(2).read(0, osize // BS)) == bytes(second)

    async def go() -> None:
        vol, pool = open_vol()
        assert vol.slots_used == 5 and vol.pieces(2, 1) == [(0, ocs, 1 * ocs)]  # chunk 2's copy: slot 1
        await check(vol)
        await vol.write((2 * U) // BS, b"\xd0" * U)  # chunk 0, unit 2: into epoch 2's copy, in its slot (3)
        assert vol.pieces(0, 2)[1] == (U, 2 * U, 3 * ocs + U)
        await vol.write((4 * ocs) // BS, b"\xd4" * U)  # chunk 4: a new copy, packed after the 5 old slots
        assert vol.pieces(4, 2)[0] == (0, U, 5 * ocs) and vol.slots_used == 6
        await check(vol)
        vol2, pool2 = open_vol()  # a crash: reopened from what is on disk, the map log as it is
        assert vol2.slots_used == 6
        await check(vol2)
        pool2.close()
        await vol.close()
        pool.close()
        vol3, pool3 = open_vol()
        await check(vol3)
        for e in (1, 2):
            await vol3.hold()
            try:
                await vol3.drop_snapshot(e)
            finally:
                vol3.release()
        assert vol3.slots_used == 0 and os.path.getsize(pool3.data_path(1)) == 0
        await vol3.close()
        pool3.close()
        pool4 = Pool("p", str(d / "pool"))
        assert pool4.load(1) == []  # nothing left in pool.db or the map log either
        pool4.close()

    run(go())


def test_a_batch_of_scattered_first_writes_is_packed_into_one_append_and_freed_blocks_are_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lunsync.snapshots import cow

    U = 4096

    async def batch(vol: CowVolume, chunks: range, byte: int) -> None:
        # Started together: they queue behind one preservation batch.
        await asyncio.gather(*(vol.write((c * CS + (c % 16) * U) // BS, pat(byte, U)) for c in chunks))

    async def go() -> None:
        vol, pool = make(tmp_path)
        await vol.write(0, pat(0xAA, 16 * CS))
        await snap(vol, 1)
        writes: list[tuple[int, int, int]] = []
        real_pwritev = os.pwritev

        def pwritev(fd: int, bufs: Any, offset: int, *a: Any) -> int:
            writes.append((fd, offset, sum(len(memoryview(b)) for b in bufs)))
            return real_pwritev(fd, bufs, offset, *a)

        monkeypatch.setattr(os, "pwritev", pwritev)
        await batch(vol, range(8), 0xB1)
        monkeypatch.undo()
        # Eight units of eight chunks, 64 KiB apart on the origin: one write of 32 KiB at the pool file's start,
        # and eight records saying where each one is.
        assert [w for w in writes if w[0] == vol._data_fd] == [(vol._data_fd, 0, 8 * U)]
        assert vol.stats.copy_batches == 1
        assert [(c, cow.PACKED - s) for _, c, _, s in log_records(pool.log_path(1))] == [(c, c) for c in range(8)]
        assert os.stat(pool.data_path(1)).st_blocks * 512 == 8 * U
        assert [vol.pieces(c, 1)[(c % 16) > 0] for c in range(8)] == [(c % 16 * U, U, c * U) for c in range(8)]
        await snap(vol, 2)
        await batch(vol, range(8), 0xB2)  # epoch 2's copies: blocks 8-15
        assert vol.pieces(3, 2)[1] == (3 * U, U, 11 * U)
        await vol.hold()
        try:
            assert await vol.drop_snapshot(1) == 8  # blocks 0-7 are free again (punched)
        finally:
            vol.release()
        assert os.stat(pool.data_path(1)).st_blocks * 512 == 8 * U
        await snap(vol, 3)
        await batch(vol, range(3), 0xB3)  # the first free run long enough: blocks 0-2, not past the end
        assert [vol.pieces(c, 3)[(c % 16) > 0][2] for c in range(3)] == [0, U, 2 * U]
        want2 = bytearray(pat(0xAA, 16 * CS))
        for c in range(8):
            want2[c * CS + c * U:c * CS + (c + 1) * U] = pat(0xB1, U)
        assert bytes(await vol.view(2).read(0, 16 * CS // BS)) == bytes(want2)
        vol2, _ = make(tmp_path, epochs=(2, 3), create=False)  # a crash: rebuilt from the records
        assert bytes(await vol2.view(2).read(0, 16 * CS // BS)) == bytes(want2)
        assert vol2._free == [(3, 5)] and vol2._end == 16
        await vol2.close()
        await vol.close()

    run(go())


def test_two_openers_of_a_new_pool_make_its_schema_once(tmp_path: Path) -> None:
    """The workers of serve --workers open the default pool together when the data dir is new; each checks for the
    mask column and adds it, so without one transaction around the schema the second failed with "duplicate column
    name: mask" about one time in eight here, and that worker had no snapshot pool."""
    import threading

    for n in range(100):
        path = str(tmp_path / f"pool{n}")
        barrier = threading.Barrier(2)
        opened: list[Pool] = []
        failed: list[BaseException] = []

        def open_it(path: str = path, barrier: threading.Barrier = barrier, opened: list[Pool] = opened,
                    failed: list[BaseException] = failed) -> None:
            barrier.wait()
            try:
                opened.append(Pool("default", path))
            except Exception as e:  # noqa: BLE001 - the assertion below shows it
                failed.append(e)

        threads = [threading.Thread(target=open_it) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in opened:
            p.close()
        assert not failed, (n, failed)

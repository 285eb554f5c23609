"""Tests for lunsync.snapshots.backend: real files in tmp_path, and a real loop device when this host allows one."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lunsync.snapshots import fsutil
from lunsync.snapshots.backend import (
    STALL_S,
    BlockDevBackend,
    FileBackend,
    StoreSpec,
    Unsupported,
    open_store,
    registered_backends,
)
from lunsync.snapshots.device import BlockDevice, InlineWrite, LbaExtent
from lunsync.snapshots.errors import MediumError, NotReady, OutOfRange, OutOfSpace, ReadOnly, StorageError
from lunsync.snapshots.model import BACKENDS

T = TypeVar("T")
MiB = 1 << 20


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def pattern(nbytes: int, seed: int = 1) -> bytes:
    """Distinct, non-zero content, so a misplaced or missing block cannot pass for the right one."""
    block = bytes((seed * 31 + i) % 251 + 1 for i in range(4096))
    return (block * (nbytes // 4096 + 1))[:nbytes]


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


def make(tmp_path: Path, size: int = 4 * MiB, block_size: int = 512, thin: bool = True) -> FileBackend:
    return FileBackend.create(tmp_path / "lun.img", size, block_size, thin)


# --- creation and opening ---------------------------------------------------------------------------------------


def test_thin_create_is_sparse_and_private(tmp_path: Path) -> None:
    dev = make(tmp_path, 64 * MiB)
    st = os.stat(dev.path)
    assert st.st_size == 64 * MiB
    assert st.st_blocks == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert dev.num_blocks == 64 * MiB // 512 and dev.thin and not dev.read_only
    assert isinstance(dev, BlockDevice)
    run(dev.close())


def test_thick_create_allocates_everything(tmp_path: Path) -> None:
    dev = make(tmp_path, 8 * MiB, thin=False)
    assert os.stat(dev.path).st_blocks * 512 >= 8 * MiB
    run(dev.close())


def test_create_refuses_existing_file_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    path.write_bytes(b"precious" * 512)
    with pytest.raises(StorageError, match="already exists"):
        FileBackend.create(path, MiB)
    assert path.read_bytes() == b"precious" * 512
    dev = FileBackend.create(path, MiB, overwrite=True)
    assert os.path.getsize(path) == MiB
    assert run(dev.read(0, 1)) == bytes(512)
    run(dev.close())


@pytest.mark.parametrize(("size", "block_size"), [(1000, 512), (0, 512), (MiB, 1024), (MiB + 512, 4096)])
def test_create_rejects_bad_geometry_without_leaving_a_file(tmp_path: Path, size: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        FileBackend.create(tmp_path / "lun.img", size, block_size)
    assert not (tmp_path / "lun.img").exists()


def test_create_rolls_back_when_allocation_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OutOfSpace):
        FileBackend.create(tmp_path / "lun.img", MiB, thin=False)
    assert not (tmp_path / "lun.img").exists()


def test_open_checks_geometry_and_existence(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 + 512))
    with pytest.raises(ValueError, match="multiple"):
        FileBackend.open(odd, 4096)
    with pytest.raises(NotReady):
        FileBackend.open(tmp_path / "missing.img")


def test_descriptor_flags(tmp_path: Path) -> None:
    dev = make(tmp_path)
    fd = dev.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    run(dev.close())
    ro = FileBackend.open(tmp_path / "lun.img", read_only=True)
    assert fcntl.fcntl(ro.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    run(ro.close())


# --- data path --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [512, 4096])
def test_round_trip_survives_reopen(tmp_path: Path, block_size: int) -> None:
    data = pattern(7 * block_size, seed=block_size)

    async def write() -> None:
        dev = make(tmp_path, MiB, block_size)
        await dev.write(3, data)
        await dev.write(20, memoryview(bytearray(data))[: 2 * block_size], fua=True)
        await dev.write(dev.num_blocks - 1, data[:block_size])
        assert await dev.read(3, 7) == data
        assert await dev.read(2, 1) == bytes(block_size)
        await dev.close()

    async def check() -> None:
        dev = FileBackend.open(tmp_path / "lun.img", block_size)
        assert dev.num_blocks == MiB // block_size
        assert await dev.read(3, 7) == data
        assert await dev.read(20, 2) == data[: 2 * block_size]
        assert await dev.read(dev.num_blocks - 1, 1) == data[:block_size]
        assert await dev.read(0, 0) == b""
        await dev.close()

    run(write())
    run(check())
    with open(tmp_path / "lun.img", "rb") as f:
        f.seek(3 * block_size)
        assert f.read(7 * block_size) == data


def test_read_returns_a_private_buffer(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path)
        await dev.write(0, pattern(1024))
        first = await dev.read(0, 2)
        second = await dev.read(0, 2)
        assert first is not second
        first[:4] = b"XXXX"  # the caller owns it: scribbling on it must not leak into later reads
        assert await dev.read(0, 2) == pattern(1024)
        assert second == pattern(1024)
        await dev.close()

    run(main())


def test_holes_read_as_zeros(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, 16 * MiB)
        await dev.write(1000, pattern(512))
        assert await dev.read(0, 1000) == bytes(1000 * 512)
        assert await dev.read(1001, 2000) == bytes(2000 * 512)
        await dev.close()

    run(main())


def test_cache_miss_finishes_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.preadv
    calls: list[tuple[int, str]] = []

    def fake(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        calls.append((flags, threading.current_thread().name))
        if flags:
            raise BlockingIOError(errno.EAGAIN, "not cached")
        return real(fd, buffers, offset)

    async def main() -> None:
        dev = make(tmp_path)
        await dev.write(8, pattern(4096))
        monkeypatch.setattr(os, "preadv", fake)
        assert await dev.read(8, 8) == pattern(4096)
        await dev.close()

    run(main())
    assert calls[0] == (os.RWF_NOWAIT, "MainThread")
    assert calls[1][0] == 0 and calls[1][1] != "MainThread"


def test_partial_cache_hit_reads_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.preadv

    def half(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        if flags:  # the first half is cached, the second is not
            view = memoryview(buffers[0])
            return real(fd, [view[: len(view) // 2]], offset)
        return real(fd, buffers, offset)

    async def main() -> None:
        dev = make(tmp_path)
        await dev.write(0, pattern(8192, seed=5))
        monkeypatch.setattr(os, "preadv", half)
        assert await dev.read(0, 16) == pattern(8192, seed=5)
        await dev.close()

    run(main())


def test_nowait_unsupported_falls_back_to_plain_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.preadv
    flags_seen: list[int] = []

    def no_nowait(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        flags_seen.append(flags)
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset)

    async def main() -> None:
        dev = make(tmp_path)
        await dev.write(0, pattern(1024))
        monkeypatch.setattr(os, "preadv", no_nowait)
        assert await dev.read(0, 2) == pattern(1024)
        assert await dev.read(0, 2) == pattern(1024)
        await dev.close()

    run(main())
    assert flags_seen.count(os.RWF_NOWAIT) == 1  # asked once, then remembered


def test_read_past_a_truncated_eof_reads_zeros(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, MiB)
        await dev.write(0, pattern(MiB))
        os.truncate(dev.path, MiB // 2 + 256)  # someone shrank the file under us, mid-block
        got = await dev.read(1023, 4)
        assert got == pattern(MiB)[1023 * 512 : MiB // 2 + 256] + bytes(256 + 2 * 512)
        assert await dev.read(2000, 48) == bytes(48 * 512)
        await dev.close()

    run(main())


def test_out_of_range_is_refused_before_any_io(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, MiB)  # 2048 blocks
        for lba, blocks in [(2047, 2), (2048, 1), (-1, 1), (0, -1), (5000, 1)]:
            with pytest.raises(OutOfRange):
                await dev.read(lba, blocks)
        with pytest.raises(OutOfRange):
            await dev.write(2047, bytes(1024))
        with pytest.raises(OutOfRange):
            await dev.unmap([(0, 8), (2040, 9)])
        for lba in (2048, -1):
            with pytest.raises(OutOfRange):
                dev.lba_status(lba)
        with pytest.raises(ValueError):
            await dev.write(0, bytes(513))
        await dev.close()

    run(main())
    assert os.path.getsize(tmp_path / "lun.img") == MiB
    assert os.stat(tmp_path / "lun.img").st_blocks == 0  # nothing was written, nothing was unmapped


def test_unmap_list_is_all_or_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, MiB)
        await dev.write(0, pattern(4096))
        with pytest.raises(OutOfRange):
            await dev.unmap([(0, 8), (2048, 1)])
        assert await dev.read(0, 8) == pattern(4096)
        await dev.close()

    run(main())


def test_read_only_refuses_every_change(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, MiB)
        await dev.write(0, pattern(4096))
        await dev.close()
        ro = FileBackend.open(tmp_path / "lun.img", read_only=True)
        assert ro.read_only
        with pytest.raises(ReadOnly):
            await ro.write(0, bytes(512))
        with pytest.raises(ReadOnly):
            await ro.unmap([(0, 8)])
        with pytest.raises(ReadOnly):
            await ro.resize(4096)
        await ro.flush()  # SYNCHRONIZE CACHE on a read-only LUN is not an error
        assert await ro.read(0, 8) == pattern(4096)
        await ro.close()

    run(main())
    assert (tmp_path / "lun.img").read_bytes()[:4096] == pattern(4096)
    assert os.path.getsize(tmp_path / "lun.img") == MiB


def test_counters(tmp_path: Path) -> None:
    async def main() -> FileBackend:
        dev = make(tmp_path)
        await dev.write(0, bytes(4096))
        await dev.read(0, 8)
        await dev.read(0, 2)
        await dev.flush()
        await dev.close()
        return dev

    dev = run(main())
    assert (dev.reads, dev.read_bytes, dev.writes, dev.write_bytes) == (2, 5120, 1, 4096)
    assert dev.flushes == 2  # the explicit flush and the one close does


# --- OSError mapping --------------------------------------------------------------------------------------------


def test_inline_write_lands_at_once_or_declines_and_leaves_it_to_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        dev = make(tmp_path)
        assert isinstance(dev, InlineWrite)
        assert dev.write_inline(8, b"a" * 1024) is True
        assert (dev.writes, dev.write_bytes) == (1, 1024)
        assert bytes(await dev.read(8, 2)) == b"a" * 1024
        with pytest.raises(OutOfRange):
            dev.write_inline(dev.num_blocks - 1, bytes(1024))
        with pytest.raises(ValueError):
            dev.write_inline(0, bytes(100))
        # An inline write that held the loop past STALL_S sends this LUN's writes to its threads for a while: the
        # next inline write declines with nothing written, and write() lands it from a thread.
        real = os.pwritev

        def slow(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
            time.sleep(STALL_S * 1.5)
            return real(fd, buffers, offset, *flags)

        monkeypatch.setattr(os, "pwritev", slow)
        assert dev.write_inline(0, b"s" * 512) is True
        monkeypatch.undo()
        assert dev.write_inline(0, b"t" * 512) is False
        assert bytes(await dev.read(0, 1)) == b"s" * 512
        await dev.write(0, b"t" * 512)
        assert bytes(await dev.read(0, 1)) == b"t" * 512
        assert dev.writes == 3
        await dev.close()
        # Closed or read-only: declined, and write() says why.
        assert dev.write_inline(0, bytes(512)) is False
        with pytest.raises(NotReady):
            await dev.write(0, bytes(512))
        ro = FileBackend.open(dev.path, read_only=True)
        assert ro.write_inline(0, bytes(512)) is False
        with pytest.raises(ReadOnly):
            await ro.write(0, bytes(512))
        assert ro.writes == 0
        await ro.close()

    run(main())


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EIO, MediumError),
        (errno.ENOSPC, OutOfSpace),
        (errno.EDQUOT, OutOfSpace),
        (errno.EROFS, ReadOnly),
        (errno.EPERM, ReadOnly),
        (errno.EBADF, NotReady),
        (errno.EINVAL, MediumError),
    ],
)
def test_write_errors_map_to_the_storage_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, expected: type[StorageError]
) -> None:
    def failing(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        raise OSError(code, os.strerror(code))

    async def main() -> None:
        dev = make(tmp_path)
        monkeypatch.setattr(os, "pwritev", failing)
        with pytest.raises(expected) as info:
            await dev.write(5, bytes(512))
        monkeypatch.undo()
        assert type(info.value) is expected
        assert isinstance(info.value.__cause__, OSError)
        if isinstance(info.value, MediumError):
            assert info.value.lba == 5 and info.value.write
        assert dev.writes == 0
        await dev.close()

    run(main())


def test_read_eio_is_a_medium_error_at_the_lba(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        raise OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        dev = make(tmp_path)
        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(MediumError) as info:
            await dev.read(77, 1)
        monkeypatch.undo()
        assert info.value.lba == 77 and not info.value.write
        await dev.close()

    run(main())


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev

    def dribble(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        return real(fd, [memoryview(buffers[0])[:700]], offset)  # the kernel may write short; the rest must follow

    async def main() -> None:
        dev = make(tmp_path)
        monkeypatch.setattr(os, "pwritev", dribble)
        await dev.write(4, pattern(8192))
        monkeypatch.undo()
        assert await dev.read(4, 16) == pattern(8192)
        await dev.close()

    run(main())


# --- durability -------------------------------------------------------------------------------------------------


def test_fua_syncs_after_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        calls.append("pwritev")
        return real_pwritev(fd, buffers, offset)

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    async def main() -> None:
        dev = make(tmp_path)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        await dev.write(0, bytes(512))
        assert calls == ["pwritev"]  # write-back: no sync
        await dev.write(1, bytes(512), fua=True)
        assert calls == ["pwritev", "pwritev", "fdatasync"]
        monkeypatch.undo()
        await dev.close()

    run(main())


def test_concurrent_flushes_share_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        dev = make(tmp_path)
        await asyncio.gather(*(dev.flush() for _ in range(10)))
        assert dev.flushes == 1
        await dev.flush()
        await dev.flush()
        assert dev.flushes == 3  # sequential flushes each need their own sync
        await dev.close()

    run(main())


def test_flush_requested_mid_sync_waits_for_a_later_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    log: list[str] = []
    gates = [threading.Event() for _ in range(3)]

    def gated(fd: int) -> None:
        n = sum(entry.endswith("start") for entry in log)
        log.append(f"sync{n} start")
        assert gates[n].wait(5)
        real(fd)
        log.append(f"sync{n} end")

    async def main() -> None:
        dev = make(tmp_path)
        monkeypatch.setattr(os, "fdatasync", gated)
        first = asyncio.create_task(dev.flush())
        await until(lambda: "sync0 start" in log)
        # This write completes after sync0 began, so sync0 may miss it: the flushes asked for now must not be
        # answered by sync0.
        await dev.write(0, pattern(512))
        log.append("requested")
        later = [asyncio.create_task(dev.flush()) for _ in range(3)]
        fua = asyncio.create_task(dev.write(1, pattern(512), fua=True))
        await asyncio.sleep(0.01)
        gates[0].set()
        await first
        assert not any(t.done() for t in [*later, fua])
        await until(lambda: "sync1 start" in log)
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in [*later, fua])
        gates[1].set()
        await asyncio.gather(*later, fua)
        gates[2].set()
        await dev.close()

    run(main())
    assert log.index("requested") < log.index("sync1 start")
    assert log == ["sync0 start", "requested", "sync0 end", "sync1 start", "sync1 end", "sync2 start", "sync2 end"]


def test_cancelled_flush_waiter_does_not_cancel_the_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    gate = threading.Event()
    started = threading.Event()

    def gated(fd: int) -> None:
        started.set()
        assert gate.wait(5)
        real(fd)

    async def main() -> None:
        dev = make(tmp_path)
        monkeypatch.setattr(os, "fdatasync", gated)
        impatient = asyncio.create_task(dev.flush())
        patient = asyncio.create_task(dev.flush())
        await until(started.is_set)
        impatient.cancel()
        await asyncio.sleep(0)
        gate.set()
        await patient
        assert impatient.cancelled()
        assert dev.flushes == 1
        await dev.close()

    run(main())


def test_cancelled_runner_releases_every_waiter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    gate = threading.Event()
    started = threading.Event()

    def gated(fd: int) -> None:
        started.set()
        assert gate.wait(5)
        real(fd)

    async def main() -> None:
        dev = make(tmp_path)
        monkeypatch.setattr(os, "fdatasync", gated)
        running = asyncio.create_task(dev.flush())
        await until(started.is_set)
        queued = asyncio.create_task(dev.flush())  # waits for the next sync, which will never start
        await asyncio.sleep(0)
        assert dev._flush_runner is not None
        dev._flush_runner.cancel()  # what loop shutdown does to a pending task
        done, _ = await asyncio.wait([running, queued], timeout=2)
        assert done == {running, queued}
        assert running.cancelled() and queued.cancelled()
        gate.set()
        monkeypatch.undo()
        await dev.flush()  # a fresh request starts a fresh runner
        await dev.close()

    run(main())


def test_failed_sync_stays_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[int] = []

    def eio(fd: int) -> None:
        attempts.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        dev = make(tmp_path)
        await dev.write(0, bytes(512))
        await dev.flush()
        assert not dev.flush_failed
        monkeypatch.setattr(os, "fdatasync", eio)
        results = await asyncio.gather(dev.flush(), dev.flush(), return_exceptions=True)
        assert all(isinstance(r, MediumError) and r.write for r in results)
        assert dev.flush_failed  # what lunsync_lun_flush_failed reports
        monkeypatch.undo()
        # The kernel would now report success for pages it may have dropped; the device must not.
        with pytest.raises(MediumError):
            await dev.flush()
        with pytest.raises(MediumError):
            await dev.write(1, bytes(512), fua=True)
        await dev.close()

    run(main())
    assert len(attempts) == 1


def test_close_waits_for_a_running_sync_before_closing_the_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    gate = threading.Event()

    def gated(fd: int) -> None:
        assert gate.wait(5)
        real(fd)

    async def main() -> None:
        dev = make(tmp_path)
        fd = dev.fileno()
        monkeypatch.setattr(os, "fdatasync", gated)
        flushing = asyncio.create_task(dev.flush())
        await asyncio.sleep(0.01)
        closing = [asyncio.create_task(dev.close()) for _ in range(2)]
        await asyncio.sleep(0.02)
        assert not any(t.done() for t in closing)
        os.fstat(fd)  # still ours while the sync runs on it
        with pytest.raises(NotReady):
            await dev.read(0, 1)  # but no new I/O is admitted
        gate.set()
        await asyncio.gather(flushing, *closing)
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
        await dev.close()  # idempotent

    run(main())


def test_close_waits_for_a_read_running_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.preadv
    gate = threading.Event()
    in_thread = threading.Event()

    def slow_miss(fd: int, buffers: list[Any], offset: int, flags: int = 0) -> int:
        if flags:
            raise BlockingIOError(errno.EAGAIN, "not cached")
        in_thread.set()
        assert gate.wait(5)
        return real(fd, buffers, offset)

    async def main() -> None:
        writer = make(tmp_path)
        await writer.write(0, pattern(4096))
        await writer.close()
        dev = FileBackend.open(tmp_path / "lun.img", read_only=True)  # read-only: close has no flush to wait on
        fd = dev.fileno()
        monkeypatch.setattr(os, "preadv", slow_miss)
        reading = asyncio.create_task(dev.read(0, 8))
        await until(in_thread.is_set)
        closing = asyncio.create_task(dev.close())
        await asyncio.sleep(0.02)
        assert not closing.done()
        os.fstat(fd)  # the descriptor outlives the read that is using it
        gate.set()
        assert await reading == pattern(4096)
        await closing
        with pytest.raises(OSError):
            os.fstat(fd)

    run(main())


# --- unmap and GET LBA STATUS -----------------------------------------------------------------------------------


def test_unmap_punches_a_hole_in_a_thin_file(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, 4 * MiB)
        await dev.write(0, pattern(4 * MiB))
        await dev.flush()
        before = os.stat(dev.path).st_blocks
        await dev.unmap([(2048, 2048), (6144, 0)])  # bytes 1 MiB..2 MiB; the empty range is a no-op
        assert await dev.read(2048, 2048) == bytes(MiB)
        assert await dev.read(0, 2048) == pattern(4 * MiB)[:MiB]
        assert await dev.read(4096, 4096) == pattern(4 * MiB)[2 * MiB :]
        fd = dev.fileno()
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB
        assert os.lseek(fd, MiB, os.SEEK_DATA) == 2 * MiB
        assert before - os.stat(dev.path).st_blocks >= MiB // 512
        assert os.path.getsize(dev.path) == 4 * MiB
        assert dev.lba_status(0) == [
            LbaExtent(0, 2048, True),
            LbaExtent(2048, 2048, False),
            LbaExtent(4096, 4096, True),
        ]
        await dev.close()

    run(main())


def test_unmap_of_part_of_a_filesystem_block_zeroes_and_stays_mapped(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, MiB)
        await dev.write(0, pattern(8192))
        await dev.unmap([(1, 2)])
        expected = pattern(8192)[:512] + bytes(1024) + pattern(8192)[1536:]
        assert await dev.read(0, 16) == expected
        assert dev.lba_status(0)[0] == LbaExtent(0, 16, True)
        await dev.close()

    run(main())


def test_unmap_keeps_a_thick_file_allocated(tmp_path: Path) -> None:
    async def main() -> None:
        dev = make(tmp_path, 4 * MiB, thin=False)
        await dev.write(0, pattern(4 * MiB))
        await dev.unmap([(0, 4096)])
        assert await dev.read(0, 4096) == bytes(2 * MiB)
        assert await dev.read(4096, 4096) == pattern(4 * MiB)[2 * MiB :]
        await dev.flush()
        assert os.stat(dev.path).st_blocks * 512 >= 4 * MiB
        assert dev.lba_status(0) == [LbaExtent(0, 8192, True)]
        await dev.close()

    run(main())


def test_unmap_writes_zeros_where_fallocate_is_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    async def main() -> None:
        dev = make(tmp_path, MiB)
        await dev.write(0, pattern(MiB))
        monkeypatch.setattr(fsutil, "fallocate", unsupported)
        await dev.unmap([(100, 1000)])
        assert await dev.read(100, 1000) == bytes(1000 * 512)
        assert await dev.read(0, 100) == pattern(MiB)[: 100 * 512]
        assert await dev.read(1100, 948) == pattern(MiB)[1100 * 512 :]
        await dev.close()

    run(main())
    assert modes == [0x02 | 0x01, 0x10 | 0x01]  # PUNCH_HOLE, then ZERO_RANGE, then zeros by hand


def test_unmap_reports_real_fallocate_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        dev = make(tmp_path, MiB)
        monkeypatch.setattr(fsutil, "fallocate", eio)
        with pytest.raises(MediumError) as info:
            await dev.unmap([(40, 8)])
        assert info.value.lba == 40 and info.value.write
        monkeypatch.undo()
        await dev.close()

    run(main())


@pytest.mark.parametrize("block_size", [512, 4096])
def test_lba_status_extents(tmp_path: Path, block_size: int) -> None:
    per_4k = 4096 // block_size  # write whole filesystem blocks so the holes are exact

    async def main() -> None:
        dev = make(tmp_path, 4 * MiB, block_size)
        n = dev.num_blocks
        await dev.write(10 * per_4k, pattern(10 * 4096))
        await dev.write(100 * per_4k, pattern(4096))
        assert dev.lba_status(0) == [
            LbaExtent(0, 10 * per_4k, False),
            LbaExtent(10 * per_4k, 10 * per_4k, True),
            LbaExtent(20 * per_4k, 80 * per_4k, False),
            LbaExtent(100 * per_4k, per_4k, True),
            LbaExtent(101 * per_4k, n - 101 * per_4k, False),
        ]
        assert dev.lba_status(0, max_extents=2) == dev.lba_status(0)[:2]
        assert dev.lba_status(15 * per_4k)[0] == LbaExtent(15 * per_4k, 5 * per_4k, True)
        assert dev.lba_status(n - 1) == [LbaExtent(n - 1, 1, False)]
        with pytest.raises(ValueError):
            dev.lba_status(0, max_extents=0)
        await dev.close()

    run(main())


def _fake_lseek(fd_of_interest: int, size: int, data_runs: list[tuple[int, int]]) -> Callable[[int, int, int], int]:
    """An lseek that reports the given byte ranges as data, to exercise partial-block rounding exactly."""
    real = os.lseek

    def lseek(fd: int, offset: int, whence: int) -> int:
        if fd != fd_of_interest or whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            return real(fd, offset, whence)
        if offset >= size:
            raise OSError(errno.ENXIO, "No such device or address")
        for start, stop in data_runs:
            if whence == os.SEEK_DATA and offset < stop:
                return max(offset, start)
            if whence == os.SEEK_HOLE and start <= offset < stop:
                return stop
        if whence == os.SEEK_DATA:
            raise OSError(errno.ENXIO, "No such device or address")
        return offset

    return lseek


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        # data 1000..3000 touches blocks 1..5: a partly backed block counts as mapped
        ([(1000, 3000)], [(0, 1, False), (1, 5, True), (6, 10, False)]),
        # a sub-block hole between two data runs does not split the mapped run
        ([(0, 700), (900, 2000)], [(0, 4, True), (4, 12, False)]),
        # data to EOF
        ([(4096, 8192)], [(0, 8, False), (8, 8, True)]),
        ([], [(0, 16, False)]),
    ],
)
def test_lba_status_rounds_partial_blocks_to_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: list[tuple[int, int]], expected: list[tuple[int, int, bool]]
) -> None:
    dev = make(tmp_path, 8192)
    monkeypatch.setattr(os, "lseek", _fake_lseek(dev.fileno(), 8192, runs))
    assert dev.lba_status(0) == [LbaExtent(*e) for e in expected]
    monkeypatch.undo()
    run(dev.close())


def test_lba_status_on_a_closed_device(tmp_path: Path) -> None:
    dev = make(tmp_path)
    run(dev.close())
    with pytest.raises(NotReady):
        dev.lba_status(0)


# --- resize -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("thin", [True, False])
def test_resize_grows_and_shrinks(tmp_path: Path, thin: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    async def main() -> None:
        dev = make(tmp_path, MiB, 4096, thin)
        await dev.write(255, pattern(4096))
        monkeypatch.setattr(os, "fsync", fsync)
        await dev.resize(1024)
        assert synced == [dev.fileno()]
        assert dev.num_blocks == 1024 and os.path.getsize(dev.path) == 4 * MiB
        assert await dev.read(255, 1) == pattern(4096)
        assert await dev.read(256, 768) == bytes(3 * MiB)
        await dev.write(1023, pattern(4096, seed=9))
        if not thin:
            assert os.stat(dev.path).st_blocks * 512 >= 4 * MiB
        await dev.resize(128)
        assert dev.num_blocks == 128 and os.path.getsize(dev.path) == MiB // 2
        with pytest.raises(OutOfRange):
            await dev.read(255, 1)
        await dev.resize(1024)
        assert await dev.read(1023, 1) == bytes(4096)  # a shrink really discards the tail
        with pytest.raises(ValueError):
            await dev.resize(0)
        await dev.close()

    run(main())


def test_thick_grow_without_space_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        dev = make(tmp_path, MiB, thin=False)
        monkeypatch.setattr(os, "posix_fallocate", no_space)
        with pytest.raises(OutOfSpace):
            await dev.resize(4096)
        monkeypatch.undo()
        assert dev.num_blocks == 2048 and os.path.getsize(dev.path) == MiB
        await dev.close()

    run(main())


# --- close ------------------------------------------------------------------------------------------------------


def test_close_flushes_and_then_refuses_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    async def main() -> None:
        dev = make(tmp_path)
        await dev.write(0, bytes(512))
        monkeypatch.setattr(os, "fdatasync", fdatasync)
        fd = dev.fileno()
        await dev.close()
        assert synced == [fd]
        for op in (dev.read(0, 1), dev.write(0, bytes(512)), dev.flush(), dev.unmap([(0, 1)]), dev.resize(10)):
            with pytest.raises(NotReady):
                await op

    run(main())


# --- block devices ----------------------------------------------------------------------------------------------


def test_open_store_opens_what_the_configuration_names(tmp_path: Path) -> None:
    assert set(registered_backends()) >= set(BACKENDS)
    spec = StoreSpec(str(tmp_path / "luns" / "lun.img"), MiB)
    dev = open_store("file", spec)  # missing: the file backend creates it
    assert type(dev) is FileBackend and dev.num_blocks == MiB // 512
    run(dev.close())
    dev = open_store("file", spec)  # present: adopted as it is
    assert type(dev) is FileBackend
    run(dev.close())
    with pytest.raises(StorageError, match="no backend 'tape'"):
        open_store("tape", spec)


def test_a_backend_refuses_a_store_of_another_kind(tmp_path: Path) -> None:
    # No guessing from what is on disk: a regular file is not a block device, and a directory is not a LUN file.
    run(make(tmp_path).close())
    with pytest.raises(ValueError, match="not a block device"):
        open_store("block", StoreSpec(str(tmp_path / "lun.img"), MiB))
    with pytest.raises(StorageError, match="Is a directory"):
        open_store("file", StoreSpec(str(tmp_path), MiB))


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loop device over an 8 MiB sparse file, detached afterwards. Skips where loop devices are unavailable."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    attach = subprocess.run(["losetup", "-f", "--show", str(image)], check=False, capture_output=True, text=True)
    if attach.returncode != 0:
        pytest.skip(f"losetup cannot attach here: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield image, device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.parametrize("block_size", [512, 4096])
def test_block_device_round_trip(loop_device: tuple[Path, str], block_size: int) -> None:
    image, device = loop_device

    async def main() -> None:
        dev = open_store("block", StoreSpec(device, 8 * MiB, block_size))
        assert type(dev) is BlockDevBackend and isinstance(dev, BlockDevice)
        assert dev.num_blocks == 8 * MiB // block_size
        await dev.write(3, pattern(4 * block_size), fua=True)
        assert await dev.read(3, 4) == pattern(4 * block_size)
        assert await dev.read(dev.num_blocks - 1, 1) == bytes(block_size)
        with pytest.raises(OutOfRange):
            await dev.read(dev.num_blocks, 1)
        assert dev.lba_status(2) == [LbaExtent(2, dev.num_blocks - 2, True)]
        with pytest.raises(Unsupported):
            await dev.resize(dev.num_blocks * 2)
        await dev.close()

    run(main())
    with open(image, "rb") as f:  # FUA reached the backing file, not just the device's page cache
        f.seek(3 * block_size)
        assert f.read(4 * block_size) == pattern(4 * block_size)


def test_a_block_device_is_not_served_as_a_file(loop_device: tuple[Path, str]) -> None:
    _, device = loop_device
    with pytest.raises(ValueError, match="backend 'block'"):
        open_store("file", StoreSpec(device, 8 * MiB))


def test_block_device_is_opened_exclusively(loop_device: tuple[Path, str]) -> None:
    _, device = loop_device
    first = BlockDevBackend.open(device)
    with pytest.raises(StorageError):
        BlockDevBackend.open(device)
    run(first.close())
    run(BlockDevBackend.open(device).close())


def test_block_device_unmap_deallocates_and_reads_zeros(loop_device: tuple[Path, str]) -> None:
    image, device = loop_device

    async def main() -> None:
        dev = BlockDevBackend.open(device, 4096)
        await dev.write(0, pattern(2 * MiB))
        await dev.flush()
        await dev.unmap([(128, 256)])  # bytes 512 KiB..1.5 MiB
        assert await dev.read(128, 256) == bytes(MiB)
        assert await dev.read(0, 128) == pattern(2 * MiB)[: MiB // 2]
        assert await dev.read(384, 128) == pattern(2 * MiB)[3 * MiB // 2 :]
        await dev.close()

    run(main())
    fd = os.open(image, os.O_RDONLY)
    try:  # the loop driver turned the zeroing discard into a hole in its backing file
        assert os.lseek(fd, 0, os.SEEK_HOLE) == MiB // 2
        assert os.lseek(fd, MiB // 2, os.SEEK_DATA) == 3 * MiB // 2
    finally:
        os.close(fd)


def test_block_device_unmap_falls_back_to_zeroout(
    loop_device: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, device = loop_device
    ioctls: list[int] = []
    real_ioctl = fcntl.ioctl

    def no_punch(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    def ioctl(fd: int, request: int, arg: Any = 0, mutate: bool = True) -> Any:
        ioctls.append(request)
        return real_ioctl(fd, request, arg, mutate)

    async def main() -> None:
        dev = BlockDevBackend.open(device)
        await dev.write(0, pattern(MiB))
        monkeypatch.setattr(fsutil, "fallocate", no_punch)
        monkeypatch.setattr(fcntl, "ioctl", ioctl)
        await dev.unmap([(8, 16)])
        monkeypatch.undo()
        assert await dev.read(8, 16) == bytes(8192)
        assert await dev.read(0, 8) == pattern(MiB)[:4096]
        assert await dev.read(24, 8) == pattern(MiB)[12288:16384]
        await dev.close()

    run(main())
    assert ioctls == [0x127F]  # BLKZEROOUT


# --- a stuck store ---------------------------------------------------------------------------------------------------


@pytest.mark.faults
def test_a_hung_store_writes_on_its_own_threads_and_refuses_past_its_queue(tmp_path: Path) -> None:
    """On FUSE (a store that may hang) writes leave the loop; once IO_QUEUE_LIMIT wait there, the next is Saturated
    (TASK SET FULL); when the store returns every queued write completes with its data."""
    from fusefs import FuseMount, fuse_available
    from lunsync.snapshots.backend import IO_QUEUE_LIMIT
    from lunsync.snapshots.errors import Saturated

    why = fuse_available()
    if why is not None:
        pytest.skip(why)
    with FuseMount(tmp_path / "src", tmp_path / "mnt") as fs:
        path = tmp_path / "mnt" / "lun.img"

        async def main() -> None:
            dev = FileBackend.create(str(path), 1 << 20, 512, thin=True)
            try:
                fs.inject(("write",), file="lun.img", hang=True)
                writes = [asyncio.ensure_future(dev.write(i, bytes([i + 1]) * 512)) for i in range(IO_QUEUE_LIMIT)]
                ticks = 0
                for _ in range(10):  # the loop keeps running while they hang
                    await asyncio.sleep(0.02)
                    ticks += 1
                assert ticks == 10 and not any(w.done() for w in writes)
                with pytest.raises(Saturated):
                    await dev.write(IO_QUEUE_LIMIT, bytes(512))
                fs.heal()
                await asyncio.wait_for(asyncio.gather(*writes), 30)
                for i in (0, IO_QUEUE_LIMIT - 1):
                    assert bytes(await dev.read(i, 1)) == bytes([i + 1]) * 512
            finally:
                fs.heal()
                await dev.close()

        asyncio.run(main())


# --- a slow store against a stuck one ---------------------------------------------------------------------------------


def _stall_then_slow(dev: FileBackend, monkeypatch: pytest.MonkeyPatch, job_s: float) -> None:
    """Send ``dev``'s writes to its threads the way a loaded host does (one inline write held the loop past STALL_S),
    and make every write there take ``job_s``."""
    real = os.pwritev

    def stalling(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        time.sleep(STALL_S * 1.5)
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "pwritev", stalling)
    assert dev.write_inline(0, bytes(512)) is True
    assert dev.write_inline(0, bytes(512)) is False  # its writes go to its threads now

    def slow(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        time.sleep(job_s)
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "pwritev", slow)


def test_writes_past_the_queue_of_a_slow_store_wait_their_turn_instead_of_task_set_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a stall a LUN's writes go to its few threads; many sessions' writes then queue past IO_QUEUE_LIMIT.
    While the threads keep finishing work, none of them is refused, even one that waits far longer than
    QUEUE_WAIT_S: answering TASK SET FULL there made qemu give up on a write after its retries (the soak's failure)."""
    from lunsync.snapshots import backend
    from lunsync.snapshots.backend import IO_QUEUE_LIMIT

    monkeypatch.setattr(backend, "QUEUE_WAIT_S", 0.1)
    n = IO_QUEUE_LIMIT + 40

    async def main() -> None:
        dev = make(tmp_path)
        _stall_then_slow(dev, monkeypatch, 0.02)  # 4 threads: the last write waits about 0.25 s
        t = time.monotonic()
        results = await asyncio.gather(*(dev.write(i, bytes([i % 255 + 1]) * 512) for i in range(n)),
                                       return_exceptions=True)
        waited = time.monotonic() - t
        assert [r for r in results if r is not None] == []
        assert waited > 0.1 * 2  # the last ones waited well past QUEUE_WAIT_S, and were served
        monkeypatch.undo()
        for i in (0, IO_QUEUE_LIMIT, n - 1):
            assert bytes(await dev.read(i, 1)) == bytes([i % 255 + 1]) * 512
        assert dev.writes == n + 1
        await dev.close()

    run(main())


def test_a_stuck_store_refuses_past_its_queue_once_nothing_finished_for_queue_wait_s(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads that finish nothing for QUEUE_WAIT_S: a command waiting for a place gets Saturated (TASK SET FULL); a
    waiting command that is cancelled gives its turn up; once the store moves again every place is free."""
    from lunsync.snapshots import backend
    from lunsync.snapshots.backend import IO_QUEUE_LIMIT
    from lunsync.snapshots.errors import Saturated

    monkeypatch.setattr(backend, "QUEUE_WAIT_S", 0.2)
    stuck = threading.Event()

    async def main() -> None:
        dev = make(tmp_path)
        _stall_then_slow(dev, monkeypatch, 0)
        real = os.pwritev

        def hanging(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
            stuck.wait(30)
            return real(fd, buffers, offset, *flags)

        monkeypatch.setattr(os, "pwritev", hanging)
        try:
            held = [asyncio.ensure_future(dev.write(i, bytes([i + 1]) * 512)) for i in range(IO_QUEUE_LIMIT)]
            await asyncio.sleep(0.05)
            assert not any(w.done() for w in held)
            cancelled = asyncio.ensure_future(dev.write(IO_QUEUE_LIMIT, bytes(512)))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            t = time.monotonic()
            with pytest.raises(Saturated):
                await dev.write(IO_QUEUE_LIMIT + 1, bytes(512))
            assert time.monotonic() - t >= 0.2
            assert cancelled.cancelled()
        finally:
            stuck.set()
        await asyncio.wait_for(asyncio.gather(*held), 30)
        # No place was lost to the refused or the cancelled command: the whole queue is there again (the LUN still
        # writes on its threads, within the stall's hold).
        monkeypatch.setattr(os, "pwritev", real)
        assert dev.write_inline(0, bytes(512)) is False
        await asyncio.gather(*(dev.write(i, b"z" * 512) for i in range(2 * IO_QUEUE_LIMIT)))
        assert dev._queued == 0 and not dev._room_waiters
        monkeypatch.undo()
        assert bytes(await dev.read(IO_QUEUE_LIMIT - 1, 1)) == b"z" * 512
        await dev.close()

    run(main())

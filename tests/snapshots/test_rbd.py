"""Tests for lunsync.snapshots.rbd against the real one-node Ceph cluster of the ``ceph_cluster`` fixture: data round
trips, flush, discard and write-zeroes reading back zeros, the allocation map, error mapping, refusals, and that no
librbd call blocks the event loop."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from ceph_cluster import POOL, CephCluster
from lunsync.snapshots import rbd as R
from lunsync.snapshots.backend import StoreSpec, open_store
from lunsync.snapshots.device import BlockDevice, ChangedRegions, LbaExtent, MappingQuery, StoreSnapshots, ZeroWriter
from lunsync.snapshots.errors import MediumError, NotReady, OutOfRange, OutOfSpace, ReadOnly, Saturated, StorageError
from lunsync.snapshots.fsutil import storage_error
from lunsync.snapshots.model import CephConfig

pytestmark = pytest.mark.e2e  # a real cluster: the session's ceph_cluster

T = TypeVar("T")
MiB = 1 << 20
OBJECT = 4 * MiB  # rbd's default object size (order 22)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def pattern(nbytes: int, seed: int = 1) -> bytes:
    """Non-zero content with a prime period (251 bytes), so no two of 251 consecutive blocks are alike and a block
    misplaced by less than that cannot pass for the right one."""
    period = bytes((i * 7 + seed) % 251 + 1 for i in range(251))
    return (period * (nbytes // 251 + 1))[:nbytes]


@pytest.fixture
def ceph(ceph_cluster: CephCluster) -> CephConfig:
    return CephConfig(conf_path=str(ceph_cluster.conf), keyring=str(ceph_cluster.keyring))


@pytest.fixture
def image(ceph: CephConfig) -> Callable[..., BlockDevice]:
    """Open (creating) fresh images for one test; every one is removed at the end."""
    made: list[str] = []

    def make(size: int = 64 * MiB, **kw: Any) -> BlockDevice:
        spec = f"{POOL}/t-{uuid.uuid4().hex[:12]}"
        made.append(spec)
        return open_store("rbd", StoreSpec(spec, size, ceph=ceph, create=True, **kw))

    yield make
    for spec in made:
        R.remove_image(ceph, spec)
    assert not R._clusters, "an image kept its cluster connection after close"


def test_declares_the_protocol_and_its_capabilities(image: Callable[..., BlockDevice]) -> None:
    dev = image(8 * MiB)
    assert isinstance(dev, BlockDevice) and isinstance(dev, ZeroWriter) and isinstance(dev, MappingQuery)
    assert isinstance(dev, StoreSnapshots)
    assert not hasattr(dev, "fileno") and not hasattr(dev, "file_extents"), "an image has no descriptor to offer"
    assert (dev.block_size, dev.num_blocks, dev.thin, dev.read_only) == (512, 16384, True, False)
    run(dev.close())


def test_write_read_flush_round_trip_and_counters(image: Callable[..., BlockDevice]) -> None:
    dev = image()

    async def go() -> None:
        data = pattern(256 << 10)
        await dev.write(100, data)
        await dev.write(2000, bytearray(pattern(4096, 9)), fua=True)
        await dev.write(3000, memoryview(pattern(8192, 3)))
        assert await dev.read(100, 512) == data
        assert await dev.read(2000, 8) == pattern(4096, 9)
        assert await dev.read(3000, 16) == pattern(8192, 3)
        assert await dev.read(50000, 8) == bytes(4096), "never written: zeros"
        await dev.flush()
        assert (dev.reads, dev.writes, dev.write_bytes) == (4, 3, (256 << 10) + 4096 + 8192)  # type: ignore[attr-defined]
        assert dev.flushes == 2  # type: ignore[attr-defined]  # the FUA write's and the explicit one
        await dev.close()

    run(go())


def test_concurrent_io_completes_on_the_loop_without_blocking_it(image: Callable[..., BlockDevice]) -> None:
    """64 writes and then 64 reads in flight at once; a ticker on the loop must keep running meanwhile, and every
    future is resolved on the loop's thread (call_soon_threadsafe), never on librbd's."""
    dev = image()

    async def go() -> None:
        loop_thread = threading.get_ident()
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        chunks = [pattern(128 << 10, i) for i in range(64)]
        await asyncio.gather(*(dev.write(i * 256, c) for i, c in enumerate(chunks)))
        got = await asyncio.gather(*(dev.read(i * 256, 256) for i in range(64)))
        stop.set()
        await t
        assert got == chunks
        assert ticks > 10, f"the loop ran only {ticks} times while 128 requests were in flight"
        assert threading.get_ident() == loop_thread
        await dev.close()

    run(go())


def test_unmap_and_write_zeroes_read_back_zeros_even_partially(image: Callable[..., BlockDevice]) -> None:
    dev = image()
    bs = 512

    async def go() -> None:
        await dev.write(0, pattern(2 * OBJECT))
        # A discard of 3 blocks inside an object, one crossing an object boundary, and a whole object.
        await dev.unmap([(1, 3), (OBJECT // bs - 2, 4)])
        head = await dev.read(0, 8)
        assert head[:bs] == pattern(2 * OBJECT)[:bs] and head[bs:4 * bs] == bytes(3 * bs)
        assert head[4 * bs:] == pattern(2 * OBJECT)[4 * bs:8 * bs]
        edge = await dev.read(OBJECT // bs - 4, 8)
        assert edge[:2 * bs] == pattern(2 * OBJECT)[OBJECT - 4 * bs:OBJECT - 2 * bs] and edge[2 * bs:6 * bs] == bytes(4 * bs)
        await dev.write_zeroes(100, 7)  # type: ignore[attr-defined]
        assert await dev.read(100, 7) == bytes(7 * bs)
        assert await dev.read(99, 1) == pattern(2 * OBJECT)[99 * bs:100 * bs]
        await dev.unmap([(OBJECT // bs, OBJECT // bs)])
        assert await dev.read(OBJECT // bs, OBJECT // bs) == bytes(OBJECT)
        await dev.close()

    run(go())


def test_query_lba_status_reports_allocated_objects(image: Callable[..., BlockDevice]) -> None:
    dev = image(64 * MiB)
    per_object = OBJECT // 512

    async def go() -> None:
        q: MappingQuery = dev  # type: ignore[assignment]
        assert await q.query_lba_status(0) == [LbaExtent(0, dev.num_blocks, False)], "a new image holds nothing"
        await dev.write(3 * per_object + 10, pattern(4096))
        got = await q.query_lba_status(0)
        mapped = [e for e in got if e.mapped]
        assert len(mapped) == 1 and mapped[0].lba <= 3 * per_object + 10 < mapped[0].lba + mapped[0].blocks
        assert mapped[0].lba >= 3 * per_object and mapped[0].lba + mapped[0].blocks <= 4 * per_object
        assert got[0] == LbaExtent(0, mapped[0].lba, False) and sum(e.blocks for e in got) == dev.num_blocks
        # From inside the mapped object, the first extent starts there (GET LBA STATUS clips to the asked LBA).
        inner = await q.query_lba_status(3 * per_object + 12, 1)
        assert inner[0].mapped and inner[0].lba <= 3 * per_object + 12
        # A whole-object discard deallocates it again.
        await dev.unmap([(3 * per_object, per_object)])
        assert await q.query_lba_status(0) == [LbaExtent(0, dev.num_blocks, False)]
        assert dev.lba_status(5) == [LbaExtent(5, dev.num_blocks - 5, True)], "inline: everything mapped"
        with pytest.raises(OutOfRange):
            await q.query_lba_status(dev.num_blocks)
        await dev.close()

    run(go())


def test_range_checks_refuse_before_librbd(image: Callable[..., BlockDevice]) -> None:
    dev = image(8 * MiB)

    async def go() -> None:
        n = dev.num_blocks
        with pytest.raises(OutOfRange):
            await dev.read(n - 1, 2)
        with pytest.raises(OutOfRange):
            await dev.write(n, bytes(512))
        with pytest.raises(OutOfRange):
            await dev.unmap([(0, 1), (n, 1)])
        with pytest.raises(ValueError):
            await dev.write(0, bytes(100))
        assert dev.writes == 0  # type: ignore[attr-defined]
        await dev.close()
        with pytest.raises(NotReady):
            await dev.read(0, 1)
        await dev.close()  # idempotent

    run(go())


def test_read_only_and_snapshot_opens_refuse_writes(image: Callable[..., BlockDevice], ceph: CephConfig) -> None:
    import rbd

    dev = image(8 * MiB)
    spec = dev.spec  # type: ignore[attr-defined]
    run(dev.write(0, pattern(4096)))
    dev.image.create_snap("s1")  # type: ignore[attr-defined]
    run(dev.write(0, bytes(4096)))
    run(dev.close())
    ro = open_store("rbd", StoreSpec(spec, 8 * MiB, ceph=ceph, read_only=True))
    at = open_store("rbd", StoreSpec(spec, 8 * MiB, ceph=ceph, snapshot="s1"))

    async def go() -> None:
        for d in (ro, at):
            assert d.read_only
            with pytest.raises(ReadOnly):
                await d.write(0, bytes(512))
            with pytest.raises(ReadOnly):
                await d.unmap([(0, 1)])
        assert await at.read(0, 8) == pattern(4096), "the snapshot keeps what was there when it was taken"
        assert await ro.read(0, 8) == bytes(4096)
        changed = await ro.allocated(0, ro.num_blocks, since="s1")  # type: ignore[attr-defined]
        assert changed and changed[0][0] == 0, "the head changed block 0 after s1"
        await ro.close()
        await at.close()

    run(go())

    def purge(ioctx: Any, image: str) -> None:
        with rbd.Image(ioctx, image) as img:
            img.remove_snap("s1")

    R._with_pool(ceph, spec, purge)


def test_store_snapshots_through_the_backend(image: Callable[..., BlockDevice]) -> None:
    """The StoreSnapshots capability: a snapshot keeps its point in time, opens read-only with the head's changed
    regions, and is removed again."""
    dev = image(16 * MiB)
    st: StoreSnapshots = dev  # type: ignore[assignment]

    async def go() -> None:
        await dev.write(0, pattern(MiB))
        st.create_snapshot("p1")
        await dev.write(8 * MiB // 512, pattern(4096, 5))
        view = st.open_snapshot("p1")
        assert view.read_only and isinstance(view, ChangedRegions)
        assert await view.read(0, MiB // 512) == pattern(MiB)
        assert await view.read(8 * MiB // 512, 8) == bytes(4096)
        assert view.changed_regions(4 * MiB) == {2}
        await view.close()
        assert st.remove_snapshot("p1") is True and st.remove_snapshot("p1") is False
        await dev.close()

    run(go())


def test_open_errors_are_clear(ceph: CephConfig, ceph_cluster: CephCluster, tmp_path: Any) -> None:
    missing = f"{POOL}/never-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NotReady, match="does not exist"):
        open_store("rbd", StoreSpec(missing, MiB, ceph=ceph))  # create not asked: a reopen never makes an image
    with pytest.raises(StorageError, match="pool 'nopool' does not exist"):
        open_store("rbd", StoreSpec("nopool/x", MiB, ceph=ceph, create=True))
    with pytest.raises(ValueError, match="POOL/IMAGE"):
        open_store("rbd", StoreSpec("just-a-name", MiB, ceph=ceph, create=True))
    with pytest.raises(NotReady, match="does not exist"):
        R.image_size(ceph, missing)
    with pytest.raises(NotReady, match="ceph.conf"):
        open_store("rbd", StoreSpec(missing, MiB, ceph=CephConfig(conf_path=str(tmp_path / "ceph.conf"))))
    # A monitor nobody answers on: an error within the connect timeout, not a hang.
    conf = tmp_path / "dead.conf"
    conf.write_text(f"[global]\nmon host = 127.0.0.1:1\nkeyring = {ceph_cluster.keyring}\n")
    started = time.monotonic()
    with pytest.raises(NotReady, match="cannot reach the Ceph cluster"):
        open_store("rbd", StoreSpec(missing, MiB, ceph=CephConfig(conf_path=str(conf), connect_timeout_s=2)))
    assert time.monotonic() - started < 15
    assert not R._clusters


def test_cluster_connection_is_shared_and_released(image: Callable[..., BlockDevice], ceph: CephConfig) -> None:
    a, b = image(MiB), image(MiB)
    assert len(R._clusters) == 1 and R._clusters[ceph].users == 2
    run(a.close())
    assert R._clusters[ceph].users == 1
    run(b.close())
    assert not R._clusters


def test_resize_grows_the_image(image: Callable[..., BlockDevice], ceph: CephConfig) -> None:
    dev = image(8 * MiB)

    async def go() -> None:
        await dev.resize(dev.num_blocks * 2)
        await dev.write(dev.num_blocks - 1, pattern(512))
        assert await dev.read(dev.num_blocks - 1, 1) == pattern(512)
        await dev.close()

    run(go())
    assert R.image_size(ceph, dev.spec) == 16 * MiB  # type: ignore[attr-defined]


def test_errno_mapping_is_the_storage_family() -> None:
    # librbd's negative errno values go through the one mapping, as the file backend's OSErrors do.
    assert isinstance(storage_error(OSError(errno.EIO, "x"), "read", 3, write=False), MediumError)
    assert isinstance(storage_error(OSError(errno.ENOSPC, "x"), "write", 3, write=True), OutOfSpace)
    assert isinstance(storage_error(OSError(errno.EROFS, "x"), "write", 3, write=True), ReadOnly)


def test_failed_completion_becomes_a_sticky_storage_error(image: Callable[..., BlockDevice]) -> None:
    """A completion with a negative return value raises the mapped error at the awaiting caller; a failed flush
    fails every later flush. The failure is injected at librbd's boundary: an aio call whose completion reports
    -EIO (a real cluster cannot be made to fail one request on demand)."""
    dev = image(MiB)

    class FailingImage:
        def __init__(self, real: Any, code: int) -> None:
            self.real, self.code = real, code

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def _fail(self, done: Callable[..., None]) -> None:
            code = self.code

            class Completion:
                def get_return_value(self) -> int:
                    return -code

            threading.Thread(target=done, args=(Completion(),)).start()

        def aio_flush(self, done: Callable[..., None]) -> None:
            self._fail(done)

        def aio_write(self, data: bytes, offset: int, done: Callable[..., None]) -> None:
            self._fail(done)

    async def go() -> None:
        real = dev.image  # type: ignore[attr-defined]
        dev.image = FailingImage(real, errno.ENOSPC)  # type: ignore[attr-defined]
        with pytest.raises(OutOfSpace):
            await dev.write(0, bytes(512))
        dev.image = FailingImage(real, errno.EIO)  # type: ignore[attr-defined]
        with pytest.raises(MediumError):
            await dev.flush()
        dev.image = real  # type: ignore[attr-defined]
        with pytest.raises(MediumError):
            await dev.flush()  # the cluster would say yes now; the lost writes stay lost
        assert dev.flush_failed  # type: ignore[attr-defined]
        await dev.close()

    run(go())


def test_saturation_refuses_beyond_the_inflight_limit(image: Callable[..., BlockDevice],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dev = image(MiB)
    monkeypatch.setattr(R, "INFLIGHT_LIMIT", 4)

    async def go() -> None:
        results = await asyncio.gather(*(dev.read(i, 1) for i in range(12)), return_exceptions=True)
        assert any(isinstance(r, Saturated) for r in results)
        assert all(isinstance(r, (bytes, Saturated)) for r in results)
        await dev.close()

    run(go())

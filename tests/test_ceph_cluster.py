"""The test Ceph cluster itself, driven the way an RBD-backed LUN drives it: librados and librbd from the venv
(Debian's bindings, linked in by ``make ceph-bindings``; never skipped), an image created, written with librbd's
asynchronous calls whose completions are handed back to the event loop, flushed, read back, snapshotted and diffed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import rados
import rbd
from ceph_cluster import POOL, CephCluster

pytestmark = pytest.mark.e2e

MiB = 1 << 20


async def aio(start: Callable[[Callable[..., None]], Any]) -> tuple[Any, ...]:
    """Run one librbd aio call; its completion (on a librbd thread) resolves a future on this loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[Any, ...]] = loop.create_future()

    def settle(result: tuple[Any, ...]) -> None:
        if fut.done():
            return
        if result[0] < 0:
            fut.set_exception(OSError(-result[0], "librbd error"))
        else:
            fut.set_result(result)

    def done(completion: Any, *rest: Any) -> None:
        loop.call_soon_threadsafe(settle, (completion.get_return_value(), *rest))

    start(done)
    return await fut


def test_the_cluster_serves_rbd_with_async_io(ceph_cluster: CephCluster) -> None:
    async def main(image: Any) -> None:
        data = bytes(range(256)) * 4096  # 1 MiB
        await aio(lambda cb: image.aio_write(data, 2 * MiB, cb))
        assert (await aio(image.aio_flush))[0] == 0
        assert (await aio(lambda cb: image.aio_read(2 * MiB, MiB, cb)))[1] == data
        image.create_snap("s1")
        await aio(lambda cb: image.aio_write(b"\xee" * 4096, 5 * MiB, cb))
        changed: list[tuple[int, int, bool]] = []
        image.diff_iterate(0, 8 * MiB, "s1", lambda off, length, exists: changed.append((off, length, exists)))
        assert changed, "the write after the snapshot is a changed extent"
        assert all(off <= 5 * MiB < off + length for off, length, _ in changed)
        image.remove_snap("s1")

    with rados.Rados(conffile=str(ceph_cluster.conf), name="client.admin") as cluster, \
            cluster.open_ioctx(POOL) as ioctx:
        rbd.RBD().create(ioctx, "probe", 8 * MiB)
        try:
            with rbd.Image(ioctx, "probe") as image:
                asyncio.run(main(image))
        finally:
            rbd.RBD().remove(ioctx, "probe")

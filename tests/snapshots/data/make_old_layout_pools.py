"""Writes the pools of ``old-layout-pools.tar.gz`` with the code on the path, which was the code before packed
copies (each copy in a chunk-sized slot at ``slot x chunk + offset``, map log records LSM3):

    git archive <commit before packed copies> | tar -x -C /tmp/old
    mkdir -p /tmp/oldpkg/lunsync && ln -s /tmp/old/{snapshots,target,provider} /tmp/oldpkg/lunsync/
    PYTHONPATH=/tmp/oldpkg python tests/snapshots/data/make_old_layout_pools.py /tmp/pools
    (cd /tmp/pools && tar -czf old-layout-pools.tar.gz closed crashed)

``closed`` was stopped cleanly (every map row in pool.db); ``crashed`` holds the files as a kill -9 left them (the
rows still in the map log). What the snapshots hold is in test_cow.py's test of these pools."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

from lunsync.snapshots.backend import FileBackend
from lunsync.snapshots.cow import CowVolume, Pool

BS, CS, SIZE, U = 512, 64 << 10, 512 << 10, 4096


async def snapshot(vol: CowVolume, epoch: int) -> None:
    await vol.hold()
    vol.add_snapshot(epoch)
    vol.release()


async def build(d: str, close: bool) -> None:
    os.makedirs(d)
    origin = FileBackend.create(os.path.join(d, "origin.img"), SIZE, BS)
    pool = Pool("p", os.path.join(d, "pool"))
    vol = CowVolume(origin, pool, 1, CS, (), name="lun")
    for c in range(SIZE // CS):
        await vol.write(c * CS // BS, bytes([0x10 + c]) * CS)
    await snapshot(vol, 1)
    await vol.write(0, b"\xb0" * U)  # chunk 0, unit 0: a partial copy for epoch 1
    await vol.write(2 * CS // BS, b"\xb2" * CS)  # chunk 2: a whole-chunk copy for epoch 1
    await vol.write((3 * CS + 5 * U) // BS, b"\xb3" * U)  # chunk 3, unit 5
    await snapshot(vol, 2)
    await vol.write(U // BS, b"\xc0" * U)  # chunk 0, unit 1: a partial copy for epoch 2
    await vol.write((3 * CS + 5 * U) // BS, b"\xc3" * U)  # chunk 3, unit 5 again: a copy for epoch 2
    if not close:
        shutil.copytree(d, d + ".copy")  # the files as they are now: the map log not checkpointed
    await vol.close()
    pool.close()
    if not close:
        shutil.rmtree(d)
        os.rename(d + ".copy", d)


if __name__ == "__main__":
    asyncio.run(build(os.path.join(sys.argv[1], "closed"), True))
    asyncio.run(build(os.path.join(sys.argv[1], "crashed"), False))

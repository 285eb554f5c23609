"""A worker process for the cross-worker snapshot-set tests: it serves the LUNs it is given on one target of its
own (a portal on a loopback port), from the data dir it shares with the test (the catalog is shared, as the workers
of ``serve --workers`` share it), and answers the hold calls of :mod:`lunsync.provider.cross_set` on the channel on
descriptor ``argv[1]``. Closing the channel stops it (after :meth:`HoldParticipant.lost`). The worker half of
tests/provider/test_cross_set.

Usage: python -m tests.provider.hold_worker FD DATA_DIR PORT IQN|- LUN[,LUN...]
"""

from __future__ import annotations

import asyncio
import socket
import sys

from lunsync.provider.channel import Channel
from lunsync.provider.cross_set import METHODS, HoldParticipant
from lunsync.provider.daemon import Array
from lunsync.provider.rpc import Call, Message, Notice, Reply
from lunsync.provider.snapshot_service import SnapshotService
from lunsync.snapshots.catalog import Catalog, CatalogError
from lunsync.target.portal import Server


async def main(fd: int, data_dir: str, port: int, iqn: str, luns: list[str]) -> None:
    cat = Catalog(data_dir)
    array = Array(data_dir, cat)
    array.snapshots = SnapshotService(array)
    for name in luns:
        await array.open_lun(name)
    if iqn != "-":  # "-": no target (a worker whose LUNs could not be opened)
        array.build_target(iqn)
    server = Server(array.directory)
    array.server = server
    await server.listen("127.0.0.1", port)
    holds = HoldParticipant(lambda: array.snapshots)
    done = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def answer(call: Call) -> None:
        try:
            result = await holds.call(call.method, call.params)
        except (CatalogError, ValueError) as e:
            channel.send(Reply(call.id, error=str(e), status=409))
            return
        channel.send(Reply(call.id, result=result))

    def on_message(msg: Message, sock: socket.socket | None) -> None:
        if isinstance(msg, Call) and msg.method in METHODS:
            task = asyncio.get_running_loop().create_task(answer(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif isinstance(msg, Call):
            channel.send(Reply(msg.id, error=f"no method {msg.method}", status=404))

    channel = Channel(socket.socket(fileno=fd), on_message, done.set)
    channel.send(Notice("ready"))
    await done.wait()
    await holds.lost()
    await server.stop()
    await array.snapshots.close()
    for live in array.luns.values():
        await live.device.close()
    cat.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], [n for n in sys.argv[5].split(",") if n]))

"""A process that serves one target on a file LUN with no listening socket of its own: every session reaches it as a
socket and a session state over the channel on descriptor ``argv[1]``. The worker half of tests/provider/test_channel.

Usage: python -m tests.provider.handoff_worker FD LUN_FILE IQN
"""

from __future__ import annotations

import asyncio
import socket
import sys

from lunsync.provider.channel import Channel, report_closed_sessions, serve_sessions
from lunsync.provider.rpc import Message, Notice
from lunsync.snapshots.backend import StoreSpec, open_store
from lunsync.snapshots.model import LunIdentity
from lunsync.target.directory import Directory, TargetEntry
from lunsync.target.portal import Server
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.target import ScsiTarget


async def main(fd: int, path: str, iqn: str) -> None:
    dev = open_store("file", StoreSpec(path, 64 << 20))
    lu = LogicalUnit(dev, LunIdentity(naa=bytes.fromhex("6001405" + "0" * 25), serial="handoff0"), name="lun0")
    directory = Directory()
    directory.add(TargetEntry(iqn, ScsiTarget(iqn, {0: lu})))
    server = Server(directory)
    done = asyncio.Event()

    def on_message(msg: Message, sock: socket.socket | None) -> None:
        serve_sessions(server, channel, msg, sock)

    channel = Channel(socket.socket(fileno=fd), on_message, done.set)
    report_closed_sessions(server, channel)
    channel.send(Notice("ready"))
    await done.wait()
    await server.stop()
    await dev.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))

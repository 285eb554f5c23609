"""The asyncio portal's connection object and its compiled task runner: what a closed connection leaves behind."""

from __future__ import annotations

import asyncio
import gc
import weakref

from lunsync.target.directory import Directory
from lunsync.target.portal import IscsiProtocol, Server


class _Sink(asyncio.Transport):
    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def write(self, data: object) -> None: ...

    def writelines(self, data: object) -> None: ...

    def is_closing(self) -> bool:
        return False


def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    # A cycle between the protocol and its runner kept every closed connection, with its receive buffers, until
    # a full collection, which the compiled path makes rare: fuzzing grew the daemon 300 MiB past its RSS bound.
    async def main() -> weakref.ref[IscsiProtocol]:
        server = Server(Directory())
        proto = IscsiProtocol(server)
        proto.connection_made(_Sink())
        proto.connection_lost(None)
        proto.timer = None  # the loop's cancelled timer handle is the loop's to drop
        return weakref.ref(proto)

    gc.disable()
    try:
        gone = asyncio.run(main())
        assert gone() is None
    finally:
        gc.enable()

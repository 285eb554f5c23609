"""The control process's worker processes: starting them, each with its channel, and restarting one that dies.

A :class:`WorkerPool` runs ``count`` worker processes, each given one end of a fresh unix socket pair (its descriptor
number is in the command line the pool's ``command`` builds) and counted as up once it sends the ``ready`` notice,
i.e. once it has opened its LUNs. A worker that exits, is killed or closes its channel is down: the portal forgets
every session it had given that worker (their connections died with it, and the initiators log in again, which is
their normal recovery), and the pool starts it again after a back-off that doubles from 0.1 s to 5 s while it keeps
dying young and starts over once it has lived 10 s. While a worker is down, :meth:`WorkerPool.channel` is None, so a
login for one of its targets is dropped before its final response and the initiator retries. The pool knows workers
by index and nothing of what they own: the placement is :mod:`lunsync.provider.assignment`'s. This is the asyncio edge;
the decisions it takes are few enough to read here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lunsync.provider.channel import Channel
from lunsync.provider.rpc import Message, Notice

log = logging.getLogger("lunsync.workers")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
HEALTHY_AFTER_S = 10.0  # a worker that lived this long died of something new: restart it at once
READY_TIMEOUT_S = 60.0  # opening many LUNs (a thick file, a cluster) takes a while, but not forever


@dataclass
class Worker:
    """One worker slot: the process in it now, its channel, and what the slot has been through."""

    index: int
    pid: int | None = None
    channel: Channel | None = None
    up: bool = False
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = BACKOFF_FIRST_S  # the wait before the next restart, if this process dies young too
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    process: asyncio.subprocess.Process | None = None


class WorkerPool:
    """``count`` worker processes under watch. ``command(index, fd)`` is the argv of worker ``index`` whose channel
    is descriptor ``fd``; ``on_message(index, msg, sock)`` gets every message but ``ready``; ``on_down(index)`` is
    told each time a worker goes down (the portal forgets the sessions it gave it)."""

    def __init__(self, count: int, command: Callable[[int, int], Sequence[str]],
                 on_message: Callable[[int, Message, socket.socket | None], None],
                 on_down: Callable[[int], None], *, env: dict[str, str] | None = None) -> None:
        self.workers = [Worker(i) for i in range(count)]
        self.command = command
        self.on_message = on_message
        self.on_down = on_down
        self.env = env
        self.stopping = False
        self._watchers: set[asyncio.Task[None]] = set()

    def channel(self, index: int) -> Channel | None:
        """The channel of worker ``index`` while it is up."""
        w = self.workers[index]
        return w.channel if w.up else None

    async def start(self) -> None:
        """Start every worker and wait until each is ready (or raise when one does not come up)."""
        for w in self.workers:
            await self._spawn(w)
        async def all_ready() -> None:
            for w in self.workers:
                await w.ready.wait()

        await asyncio.wait_for(all_ready(), READY_TIMEOUT_S)

    async def _spawn(self, w: Worker) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(*self.command(w.index, theirs.fileno()),
                                                        pass_fds=[theirs.fileno()], env=self.env)
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        w.process, w.pid, w.started_at, w.up = proc, proc.pid, loop.time(), False
        w.ready = asyncio.Event()

        def message(msg: Message, sock: socket.socket | None) -> None:
            if isinstance(msg, Notice) and msg.event == "ready":
                w.up = True
                w.ready.set()
                log.info("worker %d ready (pid %d)", w.index, proc.pid)
                return
            self.on_message(w.index, msg, sock)

        w.channel = Channel(mine, message, lambda: self._channel_closed(w, proc))
        task = loop.create_task(self._watch(w, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _channel_closed(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        # A worker whose channel broke can no longer be told anything: it is as good as dead, so make it so. (At stop
        # the closed channel is the request to drain and exit.)
        if proc.returncode is None and not self.stopping:
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    async def _watch(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        was_up = w.up
        w.up = False
        if w.channel is not None:
            w.channel.close()
        if self.stopping:
            return
        self.on_down(w.index)
        loop = asyncio.get_running_loop()
        lived = loop.time() - w.started_at
        if lived >= HEALTHY_AFTER_S:
            delay, w.backoff_s = 0.0, BACKOFF_FIRST_S
        else:
            delay, w.backoff_s = w.backoff_s, min(w.backoff_s * 2, BACKOFF_MAX_S)
        log.error("worker %d (pid %d) %s with %s after %.1f s; restarting it in %.2g s", w.index, proc.pid,
                  "exited" if was_up else "died before it was ready", _describe(code), lived, delay)
        await asyncio.sleep(delay)
        if self.stopping:
            return
        w.restarts += 1
        try:
            await self._spawn(w)
        except OSError as e:
            log.error("worker %d: cannot start: %s", w.index, e)

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Ask every worker to stop (closing its channel is the request: it drains and exits), then wait."""
        self.stopping = True
        procs = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for w in self.workers:
            if w.channel is not None:
                w.channel.close()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), timeout_s)
            except TimeoutError:
                log.warning("worker pid %d did not stop within %.0f s; killing it", p.pid, timeout_s)
                p.kill()
                await p.wait()
        for t in list(self._watchers):
            t.cancel()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"

"""Running the SCSI tasks of a connection: the part of the portal's work that happens once per command.

A :class:`TaskRunner` is the compiled half of one portal connection. It takes the events its connection raised after
a receive and runs every SCSI task among them as far as it goes without waiting (a page-cache READ or WRITE finishes
right there); it turns an unexpected exception into BUSY (a bug costs one command, never the connection), counts the
command in the statistics with its latency, and hands the response back to the connection to be queued. Every other
event, and a task that really has to wait, goes back to the portal (:class:`PortalHost`), which owns sockets, timers
and asyncio tasks. It lives apart from :mod:`lunsync.target.portal` so that the per-command loop and the state it reads
per command are native: the portal's protocol class derives from asyncio's, which a native class cannot. A command that
never waits (a plain WRITE landing inline) makes no coroutine at all; for any other, the runner starts the coroutine
by hand and the portal makes an asyncio task of it only if it suspends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, Final, Protocol

from lunsync.target.connection import Connection
from lunsync.target.events import Event, Execute
from lunsync.target.scsi.target import ScsiTarget
from lunsync.target.scsi.task import ScsiPort, ScsiResponse, ScsiTask, Status
from lunsync.target.stats import CommandStats, IoCounts

log = logging.getLogger("lunsync.iscsi")
# A module constant: the compiled build reads it from a C static, where a from-import is a dictionary lookup of the
# module's globals on every call (two per command).
_perf_counter: Final = time.perf_counter


class PortalHost(Protocol):
    """What a :class:`TaskRunner` asks of its portal connection (:class:`lunsync.target.portal.IscsiProtocol`):
    only what is not per command."""

    @property
    def initiator(self) -> str: ...

    def pump(self) -> None:
        """Parse what has arrived, run what it asks, and send what is queued."""
        ...

    def spawn(self, tag: int, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        """Carry on task ``tag``'s coroutine, which suspended on ``yielded``, as an asyncio task."""
        ...

    def event(self, ev: Event) -> None:
        """Handle an event of the connection other than :class:`~lunsync.target.events.Execute`."""
        ...


class TaskRunner:
    """The tasks of one portal connection and what counting them needs. ``tasks`` holds the commands that suspended
    (by tag, for aborts and the drain at shutdown); ``lun_io`` the session's counts per LUN number (for the API's
    session list); ``closing`` tells a task finishing after the connection went not to answer."""

    def __init__(self, host: PortalHost, stats: CommandStats, conn: Connection | None = None) -> None:
        self.host = host
        self.stats = stats
        self.conn = conn
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.lun_io: dict[int, IoCounts] = {}
        self.closing = False
        self.pumping = False  # the portal's pump is running: a task finishing now is sent by it

    def run_events(self) -> None:
        """Take the connection's events in order, until it raises no more: run each SCSI task, hand the rest to the
        portal."""
        conn = self.conn
        assert conn is not None
        box = conn.box
        host = self.host
        while box.events:
            events = box.events
            box.events = []
            for ev in events:
                if isinstance(ev, Execute):
                    self.execute(ev.task)
                else:
                    host.event(ev)

    def execute(self, task: ScsiTask) -> None:
        """Run ``task`` until it first has to wait; only then does the portal make an asyncio task of the rest.
        Code on the SCSI path must therefore not rely on asyncio.current_task() before its first suspension."""
        rest = self.start(task)
        if rest is None:  # finished within the call: no coroutine was made
            return
        try:
            yielded = rest.send(None)
        except StopIteration:
            return
        self.host.spawn(task.tag, rest, yielded)

    def start(self, task: ScsiTask) -> Coroutine[Any, Any, None] | None:
        """Execute ``task`` as far as it goes without waiting. None when it finished within this call (its response
        is queued on the connection, unless the connection is closing); else the coroutine that finishes it. A
        page-cache READ's device read is that coroutine; a plain WRITE that lands inline needs none."""
        conn = self.conn
        assert conn is not None and conn.scsi is not None
        scsi = conn.scsi
        # perf_counter, not loop.time(): uvloop's clock is cached per loop iteration at millisecond resolution.
        started = _perf_counter()
        try:
            if isinstance(scsi, ScsiTarget):
                # The daemon's own target, called natively; through the protocol it is a method lookup by name and
                # an argument tuple parsed per command.
                now = scsi.execute_now(task)
            else:
                now = scsi.execute_now(task)
        except asyncio.CancelledError:
            self._forget(task)
            return None
        except Exception:
            log.exception("SCSI task failed unexpectedly (initiator %s)", self._initiator())
            now = ScsiResponse(Status.BUSY)
        if isinstance(now, ScsiResponse):
            self._forget(task)
            self._answer(conn, scsi, task, now, started)
            return None
        return self._wait(conn, scsi, task, now, started)

    async def run(self, task: ScsiTask) -> None:
        """Execute ``task`` and queue its response (unless the connection is closing): :meth:`start` and then, if it
        had to wait, the rest."""
        rest = self.start(task)
        if rest is not None:
            await rest

    async def _wait(self, conn: Connection, scsi: ScsiPort, task: ScsiTask, pending: Awaitable[ScsiResponse],
                    started: float) -> None:
        try:
            resp = await pending
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("SCSI task failed unexpectedly (initiator %s)", self._initiator())
            resp = ScsiResponse(Status.BUSY)
        finally:
            self._forget(task)
        self._answer(conn, scsi, task, resp, started)

    def _initiator(self) -> str:
        # The portal holds its runner, not the other way round (a weak proxy): a task that fails after its
        # connection was dropped finds no portal to name it.
        try:
            return self.host.initiator
        except ReferenceError:
            return "(connection gone)"

    def _forget(self, task: ScsiTask) -> None:
        tasks = self.tasks
        if tasks:
            tasks.pop(task.tag, None)

    def _answer(self, conn: Connection, scsi: ScsiPort, task: ScsiTask, resp: ScsiResponse, started: float) -> None:
        count(self.stats, self.lun_io, scsi, task, resp, _perf_counter() - started)
        if self.closing:
            return
        conn.complete(task, resp)
        if not self.pumping:
            self.host.pump()


def count(stats: CommandStats, lun_io: dict[int, IoCounts], scsi: ScsiPort, task: ScsiTask, resp: ScsiResponse,
          seconds: float) -> None:
    """One plain-int update per command; lunsync.provider.metrics reads the totals at scrape time."""
    if isinstance(scsi, ScsiTarget):  # as in TaskRunner.start: the daemon's own target is called natively
        name = scsi.lun_name(task.lun)
    else:
        name = scsi.lun_name(task.lun)
    if name is None:
        return
    data = task.data_out
    if data is not None:
        nbytes = len(data)
    else:
        data = resp.data
        nbytes = 0 if data is None else min(len(data), task.expected_in)
    cdb = task.cdb
    stats.record(name, lun_io, task.lun, cdb[0] if cdb else 0, resp.status == 0, nbytes, seconds)

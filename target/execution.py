"""Running one SCSI task of a connection: the part of the portal's work that happens once per command.

:func:`start` runs the SCSI layer as far as it goes without waiting (:func:`run` awaits the rest too), turns an
unexpected exception into BUSY (a bug costs one command, never the connection), counts the command in the statistics with its latency, and hands the response back to the connection
to be queued. It lives apart from :mod:`lunsync.target.portal`, which owns sockets and asyncio tasks, so that it is
compiled with the rest of the data path: the portal's protocol class derives from asyncio's, which a native class
cannot. A command that never waits (a plain WRITE landing inline) makes no coroutine at all; for any other, the portal
starts the coroutine by hand and makes an asyncio task of it only if it suspends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from time import perf_counter
from typing import Any, Protocol

from lunsync.target.connection import Connection
from lunsync.target.scsi.task import ScsiPort, ScsiResponse, ScsiTask, Status
from lunsync.target.stats import CommandStats, IoCounts

log = logging.getLogger("lunsync.iscsi")


class TaskHost(Protocol):
    """What :func:`run` needs of the portal's connection (:class:`lunsync.target.portal.IscsiProtocol`)."""

    conn: Connection | None
    closing: bool
    pumping: bool
    tasks: dict[int, asyncio.Task[None]]
    lun_io: dict[int, IoCounts]  # per LUN number of this session, for the API's session list

    @property
    def stats(self) -> CommandStats: ...

    @property
    def initiator(self) -> str: ...

    def pump(self) -> None:
        """Parse what has arrived, run what it asks, and send what is queued."""
        ...


def start(host: TaskHost, task: ScsiTask) -> Coroutine[Any, Any, None] | None:
    """Execute ``task`` as far as it goes without waiting. None when it finished within this call (its response is
    queued on ``host``'s connection, unless the connection is closing); else the coroutine that finishes it, for the
    portal to drive. A page-cache READ's device read is that coroutine; a plain WRITE that lands inline needs none."""
    conn = host.conn
    assert conn is not None and conn.scsi is not None
    scsi = conn.scsi
    # perf_counter, not loop.time(): uvloop's clock is cached per loop iteration at millisecond resolution.
    started = perf_counter()
    try:
        now = scsi.execute_now(task)
    except asyncio.CancelledError:
        _forget(host, task)
        return None
    except Exception:
        log.exception("SCSI task failed unexpectedly (initiator %s)", host.initiator)
        now = ScsiResponse(Status.BUSY)
    if isinstance(now, ScsiResponse):
        _forget(host, task)
        _answer(host, conn, scsi, task, now, started)
        return None
    return _wait(host, conn, scsi, task, now, started)


async def run(host: TaskHost, task: ScsiTask) -> None:
    """Execute ``task`` and queue its response on ``host``'s connection (unless the connection is closing):
    :func:`start` and then, if it had to wait, the rest."""
    rest = start(host, task)
    if rest is not None:
        await rest


async def _wait(host: TaskHost, conn: Connection, scsi: ScsiPort, task: ScsiTask, pending: Awaitable[ScsiResponse],
                started: float) -> None:
    try:
        resp = await pending
    except asyncio.CancelledError:
        return
    except Exception:
        log.exception("SCSI task failed unexpectedly (initiator %s)", host.initiator)
        resp = ScsiResponse(Status.BUSY)
    finally:
        _forget(host, task)
    _answer(host, conn, scsi, task, resp, started)


def _forget(host: TaskHost, task: ScsiTask) -> None:
    tasks = host.tasks
    if tasks:
        tasks.pop(task.tag, None)


def _answer(host: TaskHost, conn: Connection, scsi: ScsiPort, task: ScsiTask, resp: ScsiResponse,
            started: float) -> None:
    count(host.stats, host.lun_io, scsi, task, resp, perf_counter() - started)
    if host.closing:
        return
    conn.complete(task, resp)
    if not host.pumping:
        host.pump()


def count(stats: CommandStats, lun_io: dict[int, IoCounts], scsi: ScsiPort, task: ScsiTask, resp: ScsiResponse,
          seconds: float) -> None:
    """One plain-int update per command; lunsync.provider.metrics reads the totals at scrape time."""
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

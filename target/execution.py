"""Running one SCSI task of a connection: the part of the portal's work that happens once per command.

:func:`run` awaits the SCSI layer, turns an unexpected exception into BUSY (a bug costs one command, never the
connection), counts the command in the statistics with its latency, and hands the response back to the connection
to be queued. It lives apart from :mod:`lunsync.target.portal`, which owns sockets and asyncio tasks, so that it is
compiled with the rest of the data path: the portal's protocol class derives from asyncio's, which a native class
cannot. The portal starts the coroutine by hand and makes an asyncio task of it only if it suspends.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import Protocol

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


async def run(host: TaskHost, task: ScsiTask) -> None:
    """Execute ``task`` and queue its response on ``host``'s connection (unless the connection is closing)."""
    conn = host.conn
    assert conn is not None and conn.scsi is not None
    scsi = conn.scsi
    # perf_counter, not loop.time(): uvloop's clock is cached per loop iteration at millisecond resolution.
    started = perf_counter()
    try:
        resp = await scsi.execute(task)
    except asyncio.CancelledError:
        return
    except Exception:
        log.exception("SCSI task failed unexpectedly (initiator %s)", host.initiator)
        resp = ScsiResponse(Status.BUSY)
    finally:
        tasks = host.tasks
        if tasks:
            tasks.pop(task.tag, None)
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

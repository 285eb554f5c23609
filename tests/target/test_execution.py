"""The per-command task runner: a response queued for every outcome of the SCSI layer, and each command counted once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
from lunsync.target import execution
from lunsync.target.connection import Connection, Phase
from lunsync.target.directory import Directory
from lunsync.target.scsi.task import Nexus, ScsiResponse, ScsiTask, Status, TmfFunction
from lunsync.target.stats import CommandStats, IoCounts

NEXUS = Nexus("iqn.2026-11.org.example:host", 0x23D000000001, "iqn.2026-11.io.lunsync:t")


class FakeScsi:
    """A SCSI port whose execute() answers ``outcome`` (raised when it is an exception) without suspending."""

    def __init__(self, outcome: ScsiResponse | BaseException) -> None:
        self.outcome = outcome

    async def execute(self, task: ScsiTask) -> ScsiResponse:
        return self.execute_now(task)

    def execute_now(self, task: ScsiTask) -> ScsiResponse:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def data_out_length(self, task: ScsiTask) -> int | None:
        return None

    def has_lun(self, lun: int) -> bool:
        return True

    def lun_name(self, lun: int) -> str | None:
        return "lun0"

    def reset(self, function: TmfFunction, nexus: Nexus, lun: int | None = None) -> None: ...

    def nexus_lost(self, nexus: Nexus) -> None: ...


class Host:
    def __init__(self, outcome: ScsiResponse | BaseException, *, closing: bool = False, pumping: bool = True) -> None:
        conn = Connection(Directory())
        conn.phase = Phase.FULL_FEATURE
        conn.scsi = conn.transfer.scsi = FakeScsi(outcome)
        self.conn: Connection | None = conn
        self.closing = closing
        self.pumping = pumping
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.lun_io: dict[int, IoCounts] = {}
        self._stats = CommandStats()
        self.pumped = 0

    @property
    def stats(self) -> CommandStats:
        return self._stats

    @property
    def initiator(self) -> str:
        return NEXUS.initiator_name

    def pump(self) -> None:
        self.pumped += 1


def read_task(tag: int = 7) -> ScsiTask:
    return ScsiTask(NEXUS, 0, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), tag, None, 4096, 0)


def run_inline(host: Host, task: ScsiTask) -> None:
    """Start the runner as the portal does and check it finished without suspending."""
    assert host.conn is not None
    host.conn.transfer.running[task.tag] = task  # what DataTransfer.command records when it hands a task out
    coro: Coroutine[Any, Any, None] = execution.run(host, task)
    with pytest.raises(StopIteration):
        coro.send(None)


def sent(host: Host) -> bytes:
    assert host.conn is not None
    return b"".join(bytes(b) for b in host.conn.take_output())


def test_a_good_read_is_answered_and_counted_with_its_bytes() -> None:
    host = Host(ScsiResponse(Status.GOOD, bytearray(b"\xab" * 4096)))
    run_inline(host, read_task())
    out = sent(host)
    assert out[0] == 0x25 and out[1] & 0x01  # Data-In with the status folded in
    assert out[3] == Status.GOOD and out[48:48 + 4096] == b"\xab" * 4096
    io = host.stats.luns["lun0"].io
    assert (io.reads, io.read_bytes) == (1, 4096)
    assert host.lun_io[0].reads == 1


def test_an_unexpected_exception_answers_busy_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    host = Host(RuntimeError("bug in a handler"))
    task = read_task()
    host.tasks[task.tag] = None  # type: ignore[assignment]  # only its removal is checked
    with caplog.at_level(logging.ERROR, logger="lunsync.iscsi"):
        run_inline(host, task)
    out = sent(host)
    assert out[0] == 0x21 and out[3] == Status.BUSY  # a SCSI Response, status BUSY
    assert "SCSI task failed unexpectedly" in caplog.text and NEXUS.initiator_name in caplog.text
    io = host.stats.luns["lun0"].io
    assert (io.reads, io.read_bytes) == (1, 0)  # a command that moved nothing
    assert task.tag not in host.tasks


def test_a_cancelled_task_is_neither_answered_nor_counted() -> None:
    host = Host(asyncio.CancelledError())
    task = read_task()
    host.tasks[task.tag] = None  # type: ignore[assignment]
    run_inline(host, task)
    assert sent(host) == b""
    assert "lun0" not in host.stats.luns
    assert task.tag not in host.tasks


def test_a_closing_connection_counts_but_sends_nothing() -> None:
    host = Host(ScsiResponse(Status.GOOD, bytearray(4096)), closing=True)
    run_inline(host, read_task())
    assert sent(host) == b""
    assert host.stats.luns["lun0"].io.reads == 1
    assert host.pumped == 0


def test_a_task_finishing_outside_the_pump_pumps() -> None:
    inside = Host(ScsiResponse(Status.GOOD, bytearray(4096)), pumping=True)
    run_inline(inside, read_task())
    outside = Host(ScsiResponse(Status.GOOD, bytearray(4096)), pumping=False)
    run_inline(outside, read_task())
    assert (inside.pumped, outside.pumped) == (0, 1)


def test_start_makes_no_coroutine_for_a_command_finished_in_the_call_and_one_for_a_command_that_waits() -> None:
    host = Host(ScsiResponse(Status.GOOD, bytearray(b"\xcd" * 4096)))
    assert host.conn is not None
    task = read_task()
    host.conn.transfer.running[task.tag] = task
    assert execution.start(host, task) is None  # answered and counted within the call
    assert sent(host)[48:48 + 4096] == b"\xcd" * 4096
    assert host.stats.luns["lun0"].io.reads == 1
    # A command whose SCSI layer must wait: the coroutine start returns finishes it once the wait ends.
    loop = asyncio.new_event_loop()
    try:
        later: asyncio.Future[ScsiResponse] = loop.create_future()
        host.conn.scsi.execute_now = lambda task: later  # type: ignore[union-attr,method-assign]
        task = read_task(8)
        host.conn.transfer.running[task.tag] = task
        rest = execution.start(host, task)
        assert rest is not None
        assert rest.send(None) is later  # suspended on the SCSI layer's wait
        assert sent(host) == b"" and host.stats.luns["lun0"].io.reads == 1
        later.set_result(ScsiResponse(Status.GOOD, bytearray(b"\xef" * 4096)))
        with pytest.raises(StopIteration):
            rest.send(None)
        assert sent(host)[48:48 + 4096] == b"\xef" * 4096
        assert host.stats.luns["lun0"].io.reads == 2
    finally:
        loop.close()

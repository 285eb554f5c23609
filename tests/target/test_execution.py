"""The per-command task runner: a response queued for every outcome of the SCSI layer, and each command counted once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
from lunsync.target.connection import Connection, Phase
from lunsync.target.directory import Directory
from lunsync.target.events import Event, Execute, LoggedOut, Rejected
from lunsync.target.execution import TaskRunner
from lunsync.target.pdu import RejectReason
from lunsync.target.scsi.task import Nexus, ScsiResponse, ScsiTask, Status, TmfFunction
from lunsync.target.stats import CommandStats

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
    """The portal side of a runner: counts its pumps, and records what it is handed."""

    def __init__(self) -> None:
        self.pumped = 0
        self.spawned: list[tuple[int, object]] = []
        self.events: list[Event] = []

    @property
    def initiator(self) -> str:
        return NEXUS.initiator_name

    def pump(self) -> None:
        self.pumped += 1

    def spawn(self, tag: int, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self.spawned.append((tag, yielded))
        coro.close()

    def event(self, ev: Event) -> None:
        self.events.append(ev)


def runner(outcome: ScsiResponse | BaseException, *, closing: bool = False, pumping: bool = True) -> TaskRunner:
    conn = Connection(Directory())
    conn.phase = Phase.FULL_FEATURE
    conn.scsi = conn.transfer.scsi = FakeScsi(outcome)
    run = TaskRunner(Host(), CommandStats(), conn)
    run.closing = closing
    run.pumping = pumping
    return run


def host_of(run: TaskRunner) -> Host:
    assert isinstance(run.host, Host)
    return run.host


def read_task(tag: int = 7) -> ScsiTask:
    return ScsiTask(NEXUS, 0, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), tag, None, 4096, 0)


def run_inline(run: TaskRunner, task: ScsiTask) -> None:
    """Run the task through the runner's coroutine entry and check it finished without suspending."""
    assert run.conn is not None
    run.conn.transfer.running[task.tag] = task  # what DataTransfer.command records when it hands a task out
    coro: Coroutine[Any, Any, None] = run.run(task)
    with pytest.raises(StopIteration):
        coro.send(None)


def sent(run: TaskRunner) -> bytes:
    assert run.conn is not None
    return b"".join(bytes(b) for b in run.conn.take_output())


def test_a_good_read_is_answered_and_counted_with_its_bytes() -> None:
    run = runner(ScsiResponse(Status.GOOD, bytearray(b"\xab" * 4096)))
    run_inline(run, read_task())
    out = sent(run)
    assert out[0] == 0x25 and out[1] & 0x01  # Data-In with the status folded in
    assert out[3] == Status.GOOD and out[48:48 + 4096] == b"\xab" * 4096
    io = run.stats.luns["lun0"].io
    assert (io.reads, io.read_bytes) == (1, 4096)
    assert run.lun_io[0].reads == 1


def test_an_unexpected_exception_answers_busy_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    run = runner(RuntimeError("bug in a handler"))
    task = read_task()
    run.tasks[task.tag] = None  # type: ignore[assignment]  # only its removal is checked
    with caplog.at_level(logging.ERROR, logger="lunsync.iscsi"):
        run_inline(run, task)
    out = sent(run)
    assert out[0] == 0x21 and out[3] == Status.BUSY  # a SCSI Response, status BUSY
    assert "SCSI task failed unexpectedly" in caplog.text and NEXUS.initiator_name in caplog.text
    io = run.stats.luns["lun0"].io
    assert (io.reads, io.read_bytes) == (1, 0)  # a command that moved nothing
    assert task.tag not in run.tasks


def test_a_cancelled_task_is_neither_answered_nor_counted() -> None:
    run = runner(asyncio.CancelledError())
    task = read_task()
    run.tasks[task.tag] = None  # type: ignore[assignment]
    run_inline(run, task)
    assert sent(run) == b""
    assert "lun0" not in run.stats.luns
    assert task.tag not in run.tasks


def test_a_closing_connection_counts_but_sends_nothing() -> None:
    run = runner(ScsiResponse(Status.GOOD, bytearray(4096)), closing=True)
    run_inline(run, read_task())
    assert sent(run) == b""
    assert run.stats.luns["lun0"].io.reads == 1
    assert host_of(run).pumped == 0


def test_a_task_finishing_outside_the_pump_pumps() -> None:
    inside = runner(ScsiResponse(Status.GOOD, bytearray(4096)), pumping=True)
    run_inline(inside, read_task())
    outside = runner(ScsiResponse(Status.GOOD, bytearray(4096)), pumping=False)
    run_inline(outside, read_task())
    assert (host_of(inside).pumped, host_of(outside).pumped) == (0, 1)


def test_start_makes_no_coroutine_for_a_command_finished_in_the_call_and_one_for_a_command_that_waits() -> None:
    run = runner(ScsiResponse(Status.GOOD, bytearray(b"\xcd" * 4096)))
    assert run.conn is not None
    task = read_task()
    run.conn.transfer.running[task.tag] = task
    assert run.start(task) is None  # answered and counted within the call
    assert sent(run)[48:48 + 4096] == b"\xcd" * 4096
    assert run.stats.luns["lun0"].io.reads == 1
    # A command whose SCSI layer must wait: the coroutine start returns finishes it once the wait ends.
    loop = asyncio.new_event_loop()
    try:
        later: asyncio.Future[ScsiResponse] = loop.create_future()
        run.conn.scsi.execute_now = lambda task: later  # type: ignore[union-attr,method-assign]
        task = read_task(8)
        run.conn.transfer.running[task.tag] = task
        rest = run.start(task)
        assert rest is not None
        assert rest.send(None) is later  # suspended on the SCSI layer's wait
        assert sent(run) == b"" and run.stats.luns["lun0"].io.reads == 1
        later.set_result(ScsiResponse(Status.GOOD, bytearray(b"\xef" * 4096)))
        with pytest.raises(StopIteration):
            rest.send(None)
        assert sent(run)[48:48 + 4096] == b"\xef" * 4096
        assert run.stats.luns["lun0"].io.reads == 2
    finally:
        loop.close()


def test_run_events_runs_each_task_inline_and_hands_every_other_event_to_the_portal_in_order() -> None:
    run = runner(ScsiResponse(Status.GOOD, bytearray(b"\x11" * 4096)))
    assert run.conn is not None
    box = run.conn.box
    first, second = read_task(1), read_task(2)
    for t in (first, second):
        run.conn.transfer.running[t.tag] = t
    rejected = Rejected(RejectReason.PROTOCOL_ERROR, "x")
    logged_out = LoggedOut(0)
    host = host_of(run)
    seen: list[tuple[str, int]] = []
    host.event = lambda ev: seen.append(  # type: ignore[method-assign]
        (type(ev).__name__, run.stats.luns["lun0"].io.reads))
    box.events.extend([Execute(first), rejected, Execute(second), logged_out])
    run.run_events()
    # Each event saw exactly the tasks before it done: one read before the Reject, two before the LoggedOut.
    assert seen == [("Rejected", 1), ("LoggedOut", 2)]
    assert box.events == [] and sent(run).count(b"\x11" * 4096) == 2


def test_run_events_takes_events_raised_while_it_runs_and_spawns_a_task_that_waits() -> None:
    run = runner(ScsiResponse(Status.GOOD, bytearray(4096)))
    assert run.conn is not None
    box = run.conn.box
    host = host_of(run)
    later = read_task(9)
    run.conn.transfer.running[later.tag] = later

    def event(ev: Event) -> None:
        host.events.append(ev)
        if isinstance(ev, Rejected):  # a handler that raises another event: taken in the same call
            box.events.append(Execute(later))

    host.event = event  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    try:
        pending: asyncio.Future[ScsiResponse] = loop.create_future()
        run.conn.scsi.execute_now = lambda task: pending  # type: ignore[union-attr,method-assign]
        box.events.append(Rejected(RejectReason.PROTOCOL_ERROR, "x"))
        run.run_events()
    finally:
        loop.close()
    assert [type(e).__name__ for e in host.events] == ["Rejected"]
    assert host.spawned == [(9, pending)]  # suspended on the SCSI layer's wait: the portal carries it on
    assert sent(run) == b"" and "lun0" not in run.stats.luns

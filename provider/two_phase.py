"""The two-phase hold that makes an operation spanning workers one point in time: the coordinator's state machine.

A snapshot set over LUNs of several workers must still be one point in time: no member may take its snapshot while
another member still acknowledges writes that the first one's snapshot would miss. So the control process runs the
operation in two phases. *Prepare*: every worker holds new writes on its members and drains the ones in flight, and
answers held (or failed). *Commit*: only once every worker is held, each is told to take its part (set the epochs)
and release. Any failure or the deadline before all are held aborts: every worker that was asked to prepare is told
to release, nothing is taken. A write acknowledged by any member before the all-held instant is in every snapshot;
none acknowledged after it is, because no member acknowledges between its hold and its release. Once commits are
sent the outcome is decided and each worker's answer only completes it; a worker that fails its commit is reported,
as one member's snapshot failing is in one process. The driver stops waiting for a prepare at the deadline and sends
the abort anyway; a worker's channel keeps order, so the abort never overtakes its prepare, and a worker must take an
abort that arrives while its prepare is still draining as the release of whatever it holds.

:class:`TwoPhaseHold` owns the state and says which message goes to which worker; the clock is passed in and it does
no I/O. The asyncio driver that sends the messages over the worker channels is :func:`run`. Phase changes are the
one table :data:`TRANSITIONS`.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass


class Phase(enum.Enum):
    PREPARING = "preparing"
    COMMITTING = "committing"
    DONE = "done"
    ABORTED = "aborted"


class Step(enum.Enum):
    ALL_HELD = "all-held"
    FAILED = "failed"  # a worker could not hold, or the deadline passed
    ALL_COMMITTED = "all-committed"


TRANSITIONS: dict[tuple[Phase, Step], Phase] = {
    (Phase.PREPARING, Step.ALL_HELD): Phase.COMMITTING,
    (Phase.PREPARING, Step.FAILED): Phase.ABORTED,
    (Phase.COMMITTING, Step.ALL_COMMITTED): Phase.DONE,
}


class Verb(enum.Enum):
    PREPARE = "hold.prepare"
    COMMIT = "hold.commit"
    ABORT = "hold.abort"


@dataclass(frozen=True, slots=True)
class Send:
    """Message ``verb`` to ``worker``, about its ``members``."""

    verb: Verb
    worker: int
    members: tuple[str, ...]


class TwoPhaseHold:
    """One cross-worker operation: members by worker, a deadline for the prepare phase."""

    def __init__(self, members: Mapping[int, Sequence[str]], *, now: float, timeout_s: float) -> None:
        if not members or any(not m for m in members.values()):
            raise ValueError("a two-phase hold needs at least one member on every worker it names")
        self.members = {w: tuple(m) for w, m in members.items()}
        self.deadline = now + timeout_s
        self.phase = Phase.PREPARING
        self.held: set[int] = set()
        self.committed: set[int] = set()
        self.failures: dict[int, str] = {}  # worker -> why it did not hold or commit

    def _enter(self, step: Step) -> None:
        self.phase = TRANSITIONS[self.phase, step]

    def _to_all(self, verb: Verb) -> list[Send]:
        return [Send(verb, w, m) for w, m in sorted(self.members.items())]

    def start(self) -> list[Send]:
        return self._to_all(Verb.PREPARE)

    def prepared(self, worker: int, now: float) -> list[Send]:
        """``worker`` holds its members. Commits for all once every worker does (and the deadline has not passed)."""
        if self.phase is not Phase.PREPARING or worker not in self.members:
            return []
        if now >= self.deadline:
            return self.failed(worker, "the hold was reached after its deadline")
        self.held.add(worker)
        if self.held == set(self.members):
            self._enter(Step.ALL_HELD)
            return self._to_all(Verb.COMMIT)
        return []

    def failed(self, worker: int, reason: str) -> list[Send]:
        """``worker`` answered with a failure (or was lost). Before the commit point: abort everywhere."""
        if worker in self.members:
            self.failures.setdefault(worker, reason)
        if self.phase is Phase.COMMITTING:
            return self.commit_done(worker)
        if self.phase is not Phase.PREPARING:
            return []
        self._enter(Step.FAILED)
        # Every worker asked to prepare may hold (an answer can be in flight): all are told to release.
        return self._to_all(Verb.ABORT)

    def tick(self, now: float) -> list[Send]:
        """The prepare phase's deadline: past it, the operation is abandoned."""
        if self.phase is Phase.PREPARING and now >= self.deadline:
            waiting = sorted(set(self.members) - self.held)
            return self.failed(waiting[0], "did not hold before the deadline")
        return []

    def commit_done(self, worker: int) -> list[Send]:
        """``worker`` answered its commit (with its part taken, or failed: then ``failures`` says why)."""
        if self.phase is Phase.COMMITTING and worker in self.members:
            self.committed.add(worker)
            if self.committed == set(self.members):
                self._enter(Step.ALL_COMMITTED)
        return []


class HoldFailed(Exception):
    """A two-phase operation that did not take: nothing was taken on any worker (``failures`` by worker)."""

    def __init__(self, failures: Mapping[int, str]) -> None:
        super().__init__("; ".join(f"worker {w}: {why}" for w, why in sorted(failures.items())))
        self.failures = dict(failures)


Caller = Callable[[Send], Awaitable[object]]


async def run(members: Mapping[int, Sequence[str]], call: Caller, *, timeout_s: float) -> dict[int, object]:
    """Drive one two-phase operation: ``call`` sends one message and returns the worker's answer, raising when the
    worker failed it. Returns each worker's commit answer; raises HoldFailed when it aborted (after every abort was
    answered or failed), or when a commit failed (the other workers' parts are taken: the caller undoes them)."""
    loop = asyncio.get_running_loop()
    hold = TwoPhaseHold(members, now=loop.time(), timeout_s=timeout_s)
    answers: dict[int, object] = {}
    prepares = {asyncio.ensure_future(call(s)): s.worker for s in hold.start()}
    sends: list[Send] = []
    pending = set(prepares)
    while pending and hold.phase is Phase.PREPARING:
        done, pending = await asyncio.wait(pending, timeout=max(0.0, hold.deadline - loop.time()),
                                           return_when=asyncio.FIRST_COMPLETED)
        if not done:
            sends = hold.tick(loop.time())
            break
        for fut in done:
            w = prepares[fut]
            exc = fut.exception()
            sends = hold.failed(w, str(exc) or type(exc).__name__) if exc is not None else hold.prepared(
                w, loop.time())
            if sends:
                break
    for fut in pending:
        fut.cancel()
    if hold.phase is Phase.ABORTED:
        await asyncio.gather(*(call(s) for s in sends), return_exceptions=True)
        raise HoldFailed(hold.failures)
    results = await asyncio.gather(*(call(s) for s in sends), return_exceptions=True)
    for s, r in zip(sends, results, strict=True):
        if isinstance(r, BaseException):
            hold.failed(s.worker, str(r) or type(r).__name__)
        else:
            answers[s.worker] = r
            hold.commit_done(s.worker)
    if hold.failures:
        raise HoldFailed(hold.failures)
    return answers

"""What a connection hands its owner: the events it raises and the buffers it queues to send.

The parts of a connection (:mod:`~lunsync.target.connection` itself, :mod:`~lunsync.target.transfer` and
:mod:`~lunsync.target.control`) all write into one :class:`Outbox`, which frames every PDU with the negotiated
digests, so the portal collects one list of events and one list of buffers per receive. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from lunsync.target import pdu
from lunsync.target.errors import LoginStatus
from lunsync.target.login import LoginResult
from lunsync.target.pdu import RejectReason
from lunsync.target.scsi.task import ScsiTask


@dataclass(slots=True)
class Execute:
    """A SCSI task whose Data-Out is complete: run it and call :meth:`Connection.complete`."""

    task: ScsiTask

    def __init__(self, task: ScsiTask) -> None:  # one per command: a compiled __init__ (see pdu.ScsiCommand)
        self.task = task


@dataclass(frozen=True, slots=True)
class TaskManagement:
    """A TMF request: carry it out across sessions, then call :meth:`Connection.tmf_done`."""

    request: pdu.TaskMgmtRequest


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """Login reached full feature phase. The portal registers the session (and reinstates an old one)."""

    result: LoginResult


@dataclass(frozen=True, slots=True)
class LoginFailed:
    initiator: str
    target: str
    status: LoginStatus
    reason: str


@dataclass(frozen=True, slots=True)
class LoggedOut:
    reason: int


@dataclass(frozen=True, slots=True)
class Close:
    """Close the transport once the queued output is sent."""

    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason
    message: str


Event = Execute | TaskManagement | LoggedIn | LoginFailed | LoggedOut | Close | Rejected

Out = bytes | bytearray | memoryview


class Outbox:
    """The buffers to send and the events to hand out, in order, and the digests that frame each PDU."""

    def __init__(self) -> None:
        self.out: list[Out] = []
        self.events: list[Event] = []
        self.header_digest = False
        self.data_digest = False

    def send(self, bhs: bytes, data: Out | None = None) -> None:
        self.out.extend(pdu.frame(bhs, data, self.header_digest, self.data_digest))

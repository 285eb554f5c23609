"""The types that cross between the iSCSI session layer and the SCSI layer.

The iSCSI layer builds a :class:`ScsiTask` once all of a command's Data-Out has arrived, awaits
:meth:`ScsiTarget.execute` (see :mod:`lunsync.target.scsi.target`), and turns the :class:`ScsiResponse` into Data-In
and SCSI Response PDUs, computing residuals from ``len(data)`` against the expected transfer length. The SCSI layer
never sees a PDU; the iSCSI layer never parses a CDB.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from lunsync.snapshots.device import Buffer


class Status(enum.IntEnum):
    """SAM-5 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class TaskAttr(enum.IntEnum):
    """iSCSI task attributes (RFC 7143 §11.3.1, ATTR field)."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: one initiator port talking to one target port (SAM-5 §4.6)."""

    initiator_name: str
    isid: int
    target_name: str
    tpgt: int = 1
    relative_port: int = 1
    # Every command looks its nexus up in its LU's unit-attention table: hash the five fields once, not per lookup.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.initiator_name, self.isid, self.target_name, self.tpgt,
                                                self.relative_port)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def initiator_port(self) -> str:
        """The SCSI initiator port name, RFC 7143 §4.2.7.1: ``iqn,i,0x<ISID>``."""
        return f"{self.initiator_name},i,0x{self.isid:012x}"

    @property
    def target_port(self) -> str:
        """The SCSI target port name: ``iqn,t,0x<TPGT>``."""
        return f"{self.target_name},t,0x{self.tpgt:04x}"


@dataclass(slots=True)
class ScsiTask:
    """One SCSI command, with all of its Data-Out gathered."""

    nexus: Nexus
    lun: int
    cdb: bytes
    tag: int
    data_out: Buffer | None = None
    expected_in: int = 0
    expected_out: int = 0
    attr: TaskAttr = TaskAttr.SIMPLE
    # The Data-Out length the CDB asks for, when the handler has already worked it out (-1: not known). The transport
    # needs it for a write's residual; a READ/WRITE handler sets it so the CDB is not parsed twice per command.
    out_length: int = -1

    # One per command: written out so the compiled build runs a compiled __init__ (see lunsync.target.pdu.ScsiCommand).
    def __init__(self, nexus: Nexus, lun: int, cdb: bytes, tag: int, data_out: Buffer | None = None,
                 expected_in: int = 0, expected_out: int = 0, attr: TaskAttr = TaskAttr.SIMPLE,
                 out_length: int = -1) -> None:
        self.nexus = nexus
        self.lun = lun
        self.cdb = cdb
        self.tag = tag
        self.data_out = data_out
        self.expected_in = expected_in
        self.expected_out = expected_out
        self.attr = attr
        self.out_length = out_length


@dataclass(slots=True)
class ScsiResponse:
    """The outcome of a task. ``data`` may be longer than the initiator asked for; the transport truncates it and
    reports the overflow as a residual. ``sense`` is fixed-format sense data, present with CHECK CONDITION."""

    status: Status = Status.GOOD
    data: Buffer | None = None
    sense: bytes | None = None

    def __init__(self, status: Status = Status.GOOD, data: Buffer | None = None, sense: bytes | None = None) -> None:
        self.status = status  # one per command, written out as ScsiTask's
        self.data = data
        self.sense = sense


class TmfFunction(enum.IntEnum):
    """Task management functions (RFC 7143 §11.5.1)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class ScsiPort(Protocol):
    """What the iSCSI layer asks of a SCSI target, and all it may ask: the connection, the portal and task
    management see a target only through this (:class:`lunsync.target.scsi.target.ScsiTarget` provides it)."""

    async def execute(self, task: ScsiTask) -> ScsiResponse:
        """Run one command to completion; never raises for a SCSI error (those are CHECK CONDITION responses)."""
        ...

    def execute_now(self, task: ScsiTask) -> ScsiResponse | Awaitable[ScsiResponse]:
        """:meth:`execute` as far as it goes without waiting: the response when the command finished within this
        call, else an awaitable of it (what the per-command runner uses, to make no coroutine for a command that
        never waits)."""
        ...

    def data_out_length(self, task: ScsiTask) -> int | None:
        """The Data-Out bytes the CDB asks for, for a write's residual; ``None`` when it moves none."""
        ...

    def has_lun(self, lun: int) -> bool: ...

    def lun_name(self, lun: int) -> str | None:
        """The LU's name for statistics; ``None`` when the LUN does not exist."""
        ...

    def reset(self, function: TmfFunction, nexus: Nexus, lun: int | None = None) -> None:
        """The SCSI side effects of a task management function (the transport aborts the tasks)."""
        ...

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus ended: release what it held that does not outlive it."""
        ...

    def take_peer_waits(self) -> list[Awaitable[None]]:
        """What the response to the task management function just carried out must wait for: other gateways
        applying its reset to their nexuses of a shared LU. Usually empty."""
        ...

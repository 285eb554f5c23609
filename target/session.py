"""Sessions and task management without sockets: the session table and what each TMF function does.

This module owns the session table of one portal (TSIH assignment within ``max_sessions``, registration with session
reinstatement, RFC 7143 §6.3.5) and task management (RFC 7143 §11.5): which tasks of which sessions a function
aborts, which SCSI reset it asks of the target, the response code (:class:`TmfResponse`), and which sessions end
once the response is on its way. Sessions are reached through the small :class:`Session` protocol, so the asyncio
portal plugs its connections in and the unit tests plug in plain objects; the clock is passed in, never read.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from lunsync.target.login import LoginResult
from lunsync.target.pdu import TaskMgmtRequest
from lunsync.target.scsi.task import Nexus, TmfFunction
from lunsync.target.sequencing import sn_le, sn_lt

log = logging.getLogger("lunsync.iscsi")

class TmfResponse(enum.IntEnum):
    """The Response field of a Task Management Function Response (RFC 7143 §11.6.1)."""

    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    FUNCTION_NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class Session(Protocol):
    """What the session table and task management need of one logged-in session."""

    @property
    def login_result(self) -> LoginResult | None: ...

    def abort(self, tag: int) -> bool:
        """Forget task ``tag`` (no response will be sent for it); True if it existed."""
        ...

    def abort_lun(self, lun: int | None) -> int:
        """Abort every task of this session (on ``lun``, when given); how many there were."""
        ...

    def close(self) -> None:
        """Close the session's connection once what is queued has been sent."""
        ...


class ResettableTarget(Protocol):
    """The part of a SCSI target task management drives."""

    def has_lun(self, lun: int) -> bool: ...

    def reset(self, function: TmfFunction, nexus: Nexus, lun: int | None = None) -> None: ...


S = TypeVar("S", bound=Session)


@dataclass(frozen=True, slots=True)
class SessionEntry(Generic[S]):
    session: S
    result: LoginResult
    since: float  # the clock value at login, for listings


@dataclass(frozen=True, slots=True)
class TmfOutcome(Generic[S]):
    """What a TMF came to: the response to send, and the sessions to close after it (a cold reset)."""

    response: TmfResponse
    close_after: tuple[S, ...] = ()


def _target_name(r: LoginResult) -> str | None:
    return r.target.name if r.target is not None else None


class SessionTable(Generic[S]):
    """Every logged-in session of a portal, by TSIH."""

    def __init__(self, max_sessions: int = 256) -> None:
        self.max_sessions = max_sessions
        self._entries: dict[int, SessionEntry[S]] = {}
        self._tsih = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tsih: int) -> bool:
        return tsih in self._entries

    def get(self, tsih: int) -> S | None:
        e = self._entries.get(tsih)
        return e.session if e is not None else None

    def entry(self, tsih: int) -> SessionEntry[S] | None:
        return self._entries.get(tsih)

    def items(self) -> Iterator[tuple[int, S]]:
        """(TSIH, session) pairs, in TSIH order."""
        for tsih in sorted(self._entries):
            yield tsih, self._entries[tsih].session

    def allocate_tsih(self) -> int:
        """A free TSIH for a login about to complete, or 0 when ``max_sessions`` sessions already exist."""
        if len(self._entries) >= self.max_sessions:
            return 0
        for _ in range(0xFFFF):
            self._tsih = self._tsih % 0xFFFF + 1
            if self._tsih not in self._entries:
                return self._tsih
        raise RuntimeError("no free TSIH")

    def register(self, session: S, result: LoginResult, now: float) -> list[S]:
        """Enter a session that reached full feature phase. A leading login with the ISID, initiator and target of
        an existing session reinstates it (RFC 7143 §6.3.5): the old sessions are removed and returned, for the
        caller to abort their tasks and close them."""
        old = [tsih for tsih, e in self._entries.items()
               if e.result.isid == result.isid and e.result.initiator_name == result.initiator_name
               and _target_name(e.result) == _target_name(result) and e.session is not session]
        replaced = []
        for tsih in old:
            e = self._entries.pop(tsih)
            log.info("session reinstatement initiator=%s isid=0x%012x tsih=%d", e.result.initiator_name,
                     e.result.isid, tsih)
            replaced.append(e.session)
        self._entries[result.tsih] = SessionEntry(session, result, now)
        return replaced

    def remove(self, tsih: int, session: S) -> bool:
        """Forget ``session`` under ``tsih``, unless that TSIH now belongs to another (reinstated) session."""
        e = self._entries.get(tsih)
        if e is None or e.session is not session:
            return False
        del self._entries[tsih]
        return True

    def of_target(self, target_name: str) -> list[S]:
        """Normal sessions logged in to ``target_name``."""
        return [e.session for e in self._entries.values() if _target_name(e.result) == target_name]

    # -- task management (RFC 7143 §11.5) ---------------------------------------------------------------------------

    def task_management(self, session: S, req: TaskMgmtRequest, *, target: ResettableTarget | None,
                        nexus: Nexus | None, exp_cmd_sn: int) -> TmfOutcome[S]:
        """Carry out ``req`` received on ``session`` (whose CmdSN window expects ``exp_cmd_sn`` next)."""
        f = req.function
        if target is None or nexus is None:
            return TmfOutcome(TmfResponse.REJECTED)  # a discovery session has no tasks to manage
        if f == TmfFunction.ABORT_TASK:
            if session.abort(req.rtt):
                return TmfOutcome(TmfResponse.FUNCTION_COMPLETE)
            if sn_le(exp_cmd_sn, req.ref_cmd_sn) and sn_lt(req.ref_cmd_sn, req.cmd_sn):
                # Not yet received: consider it received and aborted (RFC 7143 §11.5.1).
                return TmfOutcome(TmfResponse.FUNCTION_COMPLETE)
            return TmfOutcome(TmfResponse.TASK_DOES_NOT_EXIST)
        if f in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET, TmfFunction.LOGICAL_UNIT_RESET):
            if not target.has_lun(req.lun):
                return TmfOutcome(TmfResponse.LUN_DOES_NOT_EXIST if f == TmfFunction.LOGICAL_UNIT_RESET
                                  else TmfResponse.FUNCTION_COMPLETE)
            victims = [session] if f == TmfFunction.ABORT_TASK_SET else self.of_target(nexus.target_name)
            for s in victims:
                s.abort_lun(req.lun)
            if f != TmfFunction.ABORT_TASK_SET:
                target.reset(TmfFunction(f), nexus, req.lun)
            return TmfOutcome(TmfResponse.FUNCTION_COMPLETE)
        if f in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            sessions = self.of_target(nexus.target_name)
            for s in sessions:
                s.abort_lun(None)
            target.reset(TmfFunction(f), nexus, None)
            # A cold reset ends every session of the target after the response is on its way.
            return TmfOutcome(TmfResponse.FUNCTION_COMPLETE,
                              tuple(sessions) if f == TmfFunction.TARGET_COLD_RESET else ())
        if f == TmfFunction.CLEAR_ACA:
            return TmfOutcome(TmfResponse.FUNCTION_NOT_SUPPORTED)
        if f == TmfFunction.TASK_REASSIGN:
            # ErrorRecoveryLevel 0 has no task reassignment (RFC 7143 §11.6.1).
            return TmfOutcome(TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
        return TmfOutcome(TmfResponse.REJECTED)

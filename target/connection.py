"""The iSCSI connection state machine (RFC 7143): framing, digests, phases and login, and the routing of each PDU.

A :class:`Connection` knows nothing of sockets. The portal hands it received bytes (into the buffer it lends) and the
time; it returns events (a SCSI task ready to run, a task-management request, a finished login, a close) and the
buffers to send. The portal runs SCSI tasks and hands their outcomes back through :meth:`Connection.complete`.
Which opcode is legal in which phase is the one table :data:`ALLOWED`; how phases change is the one table
:data:`TRANSITIONS`. The connection's other parts each have their module: sequence numbers and the CmdSN window
(:mod:`~lunsync.target.sequencing`), SCSI data transfer (:mod:`~lunsync.target.transfer`), and Text, Logout and NOP
(:mod:`~lunsync.target.control`); they share one :class:`~lunsync.target.events.Outbox`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Final, cast

from lunsync.target import keys, pdu
from lunsync.target.control import Control
from lunsync.target.directory import Directory
from lunsync.target.errors import LoginError, LoginStatus, ProtocolError
from lunsync.target.events import (
    Close,
    Event,
    Execute,
    LoggedIn,
    LoggedOut,
    LoginFailed,
    Out,
    Outbox,
    Rejected,
    TaskManagement,
)
from lunsync.target.login import LoginMachine, LoginResult
from lunsync.target.pdu import Op, RejectReason
from lunsync.target.scsi.task import Nexus, ScsiPort, ScsiResponse, ScsiTask
from lunsync.target.sequencing import Admit, Sequencer
from lunsync.target.transfer import DataTransfer

log = logging.getLogger("lunsync.iscsi")

# The events are part of what this module hands out; they are defined with the Outbox the parts share.
__all__ = ["ALLOWED", "TRANSITIONS", "Close", "Connection", "Event", "Execute", "LoggedIn", "LoggedOut", "LoginFailed",
           "Out", "Phase", "Rejected", "TaskManagement", "Transition"]

RECV_BUFFER: Final = 1024 * 1024  # at least two of the largest PDUs we accept; see Connection.__init__


class Phase(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"
    CLOSED = "closed"
    HANDED_OFF = "handed-off"  # logged in here, then given (socket and state) to another process to serve


ALLOWED: Final[dict[Phase, frozenset[int]]] = {
    Phase.LOGIN: frozenset({Op.LOGIN_REQ}),
    Phase.FULL_FEATURE: frozenset(pdu.INITIATOR_OPS - {Op.LOGIN_REQ}),
    Phase.LOGGED_OUT: frozenset(),
    Phase.CLOSED: frozenset(),
    Phase.HANDED_OFF: frozenset(),
}


class Transition(enum.Enum):
    """What moves a connection from one phase to another (RFC 7143 §8.1's connection states, as lunsync has them)."""

    LOGIN_DONE = "login-done"  # the final Login Response went out with status 0
    LOGIN_FAILED = "login-failed"  # a Login Response with an error status went out
    LOGGED_OUT = "logged-out"  # a Logout Response went out
    FATAL = "fatal"  # a protocol error or timeout: close without a response
    HAND_OFF = "hand-off"  # the final Login Response is ready and another process serves the session from here
    ADOPTED = "adopted"  # this connection takes over a session another process logged in


# Every phase change; a pair that is missing is a bug in this module, not the peer's doing.
TRANSITIONS: Final[dict[tuple[Phase, Transition], Phase]] = {
    (Phase.LOGIN, Transition.LOGIN_DONE): Phase.FULL_FEATURE,
    (Phase.LOGIN, Transition.LOGIN_FAILED): Phase.CLOSED,
    (Phase.FULL_FEATURE, Transition.LOGGED_OUT): Phase.LOGGED_OUT,
    (Phase.LOGIN, Transition.HAND_OFF): Phase.HANDED_OFF,
    (Phase.LOGIN, Transition.ADOPTED): Phase.FULL_FEATURE,
    **{(phase, Transition.FATAL): Phase.CLOSED for phase in Phase},
}
_STOPPED: Final = (Phase.CLOSED, Phase.LOGGED_OUT, Phase.HANDED_OFF)  # phases in which nothing more is parsed
_FULL_FEATURE_OPS: Final = ALLOWED[Phase.FULL_FEATURE]  # checked per PDU: an Enum key hashes in Python, so skip the dict
# Per-PDU tests name these through Final aliases: an enum member is an attribute lookup on its class each time.
_FULL_FEATURE: Final = Phase.FULL_FEATURE
_ADMIT_NOW: Final = Admit.NOW
DISCOVERY_ALLOWED: Final = frozenset({Op.TEXT_REQ, Op.LOGOUT_REQ, Op.NOP_OUT})
# PDUs that carry a CmdSN and so pass through the command window (RFC 7143 §4.2.2).
_SEQUENCED_OPS: Final = frozenset(int(o) for o in (Op.SCSI_CMD, Op.NOP_OUT, Op.TEXT_REQ, Op.TMF_REQ, Op.LOGOUT_REQ))
_NO_DATA: Final = memoryview(b"")  # the data segment of a PDU without one: one view for all, not a slice each
_Sequenced = pdu.ScsiCommand | pdu.NopOut | pdu.TextRequest | pdu.TaskMgmtRequest | pdu.LogoutRequest


def _bhs(view: memoryview, s: int) -> bytes:
    """A copy of the BHS at ``s`` (what a Reject quotes, RFC 7143 §11.17.1)."""
    return bytes(view[s:s + pdu.BHS_LEN])


class Connection:
    """One iSCSI connection: bytes in, events and bytes out."""

    def __init__(
        self,
        directory: Directory,
        *,
        peer: str = "?",
        local: tuple[str, int] | None = None,
        tpgt: int = 1,
        now: float = 0.0,
        nop_interval_s: float = 30.0,
        nop_timeout_s: float = 15.0,
        login_timeout_s: float = 15.0,
        target_limits: dict[str, str] | None = None,
        allocate_tsih: Callable[[], int] | None = None,
        hand_off: bool = False,
    ) -> None:
        self.directory = directory
        self.peer = peer
        self.tpgt = tpgt
        self.phase = Phase.LOGIN
        self.login = LoginMachine(directory, tpgt=tpgt, target_limits=target_limits)
        self.result: LoginResult | None = None
        self.discovery = False  # result.discovery, as a native attribute: every PDU tests it
        self.nexus: Nexus | None = None
        self.scsi: ScsiPort | None = None  # the logged-in target's SCSI side; None in login and discovery
        self._allocate_tsih = allocate_tsih or (lambda: 1)
        # A portal that only logs in (the control process of ``--workers``): a normal session stops at HANDED_OFF
        # with its final Login Response queued, and what arrived after it stays unparsed for the next owner.
        self.hand_off = hand_off
        ours = int((target_limits or {}).get("MaxRecvDataSegmentLength", "262144"))
        # Room for two whole PDUs of the largest data segment we declare, so one is always parsed in place; small
        # enough that 16 sessions stay well inside the RSS budget.
        self.buf = bytearray(max(RECV_BUFFER, 2 * (ours + 2048)))
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.max_recv = 8192  # what we accept before negotiation completes
        self.login_deadline = now + login_timeout_s if login_timeout_s > 0 else None
        self.last_rx = now
        self.box = Outbox()
        self.seq: Sequencer[pdu.InitiatorPdu] = Sequencer()
        self.transfer = DataTransfer(self.box, self.seq, peer)
        self.control = Control(self.box, self.seq, self.transfer, directory, local=local,
                               target_limits=self.login.target_limits, nop_interval_s=nop_interval_s,
                               nop_timeout_s=nop_timeout_s)

    # The sequence numbers, as the portal's task management and the tests read them.
    @property
    def stat_sn(self) -> int:
        return self.seq.stat_sn

    @property
    def exp_cmd_sn(self) -> int:
        return self.seq.exp_cmd_sn

    @property
    def max_cmd_sn(self) -> int:
        return self.seq.max_cmd_sn

    @property
    def params(self) -> keys.NegotiatedParams | None:
        """The operational parameters in force (login's, then any Text renegotiation's)."""
        return self.transfer.params

    # -- input --------------------------------------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the portal should receive into (BufferedProtocol.get_buffer)."""
        if self.end == len(self.buf):
            self._compact()
        return self.view[self.end:]

    def _compact(self) -> None:
        n = self.end - self.start
        if self.start:
            self.buf[0:n] = self.view[self.start:self.end]
        self.start, self.end = 0, n

    def buffer_updated(self, nbytes: int, now: float) -> None:
        """``nbytes`` arrived in the buffer returned by :meth:`get_buffer`. Parses every complete PDU."""
        self.end += nbytes
        self.last_rx = now
        view = self.view
        # The length fields are read from the bytearray, not its view: an item of a bytearray is a native read in the
        # compiled build, one of a memoryview a Python call with an int object made for the index.
        buf = self.buf
        box = self.box
        while True:
            phase = self.phase
            if phase is not _FULL_FEATURE and phase in _STOPPED:
                break
            s = self.start
            avail = self.end - s
            if avail < pdu.BHS_LEN:
                break
            # The length fields straight from the receive buffer (RFC 7143 §11.2): no slice of it per PDU.
            ahs = buf[s + 4] * 4
            dlen = (buf[s + 5] << 16) | (buf[s + 6] << 8) | buf[s + 7]
            limit = self.max_recv
            if dlen > limit:
                self._fatal(f"data segment of {dlen} bytes exceeds MaxRecvDataSegmentLength {limit}")
                break
            total = pdu.frame_size(ahs, dlen, box.header_digest, box.data_digest)
            if avail < total:
                if total > len(self.buf):
                    self._fatal("PDU larger than the receive buffer")
                break
            self.start += total
            self._one_pdu(view, s, ahs, dlen)
        if self.start == self.end:
            self.start = self.end = 0
        elif self.start > len(self.buf) // 2:
            self._compact()

    def _one_pdu(self, view: memoryview, s: int, ahs: int, dlen: int) -> None:
        # The BHS is read where it lies in the receive buffer; only an answer that quotes it (a Reject) copies it.
        p = s + pdu.BHS_LEN + ahs
        box = self.box
        if box.header_digest:
            want = int.from_bytes(view[p:p + 4], "little")
            if pdu.crc32c(view[s:p]) != want:
                # RFC 7143 §7.8: a header digest error cannot be trusted even for its length: drop the connection.
                self._fatal("header digest error")
                return
            p += 4
        data = view[p:p + dlen] if dlen else _NO_DATA
        if dlen and box.data_digest:
            pad = pdu.pad_len(dlen)
            want = int.from_bytes(view[p + dlen + pad:p + dlen + pad + 4], "little")
            if pdu.crc32c(view[p:p + dlen + pad]) != want:
                self._reject(_bhs(view, s), RejectReason.DATA_DIGEST_ERROR, "data digest error")
                return
        op = self.buf[s] & 0x3F  # from the bytearray, as in buffer_updated
        phase = self.phase
        if op not in (_FULL_FEATURE_OPS if phase is _FULL_FEATURE else ALLOWED[phase]):
            if self.phase == Phase.LOGIN:
                if self.login.first is not None:
                    # A login is under way: answer "invalid during login" (RFC 7143 §11.13.5), then close.
                    first = self.login.first
                    seq = self.seq
                    box.send(pdu.encode_login_response(
                        transit=False, cont=False, csg=first.csg, nsg=0, isid=first.isid, tsih=0,
                        itt=int.from_bytes(view[s + 16:s + 20], "big"), stat_sn=seq.next_stat_sn(),
                        exp_cmd_sn=seq.exp_cmd_sn, max_cmd_sn=seq.max_cmd_sn,
                        status_class=LoginStatus.INVALID_DURING_LOGIN >> 8,
                        status_detail=LoginStatus.INVALID_DURING_LOGIN & 0xFF, length=0))
                    box.events.append(LoginFailed(self.login.initiator_name, "", LoginStatus.INVALID_DURING_LOGIN,
                                                   f"opcode 0x{op:02x} during login"))
                self._fatal(f"opcode 0x{op:02x} before login completed")
            elif op == Op.LOGIN_REQ:
                self._reject(_bhs(view, s), RejectReason.PROTOCOL_ERROR, "login request in full feature phase")
            else:
                self._reject(_bhs(view, s), RejectReason.COMMAND_NOT_SUPPORTED, f"opcode 0x{op:02x} not supported")
            return
        if self.discovery and op not in DISCOVERY_ALLOWED:
            self._reject(_bhs(view, s), RejectReason.PROTOCOL_ERROR, "only Text, NOP and Logout in discovery sessions")
            return
        try:
            # A SCSI Command's BHS is whole here (buffer_updated checked its length): no re-check, no opcode dispatch.
            decoded = pdu.decode_scsi_command(view, s) if op == 0x01 else pdu.decode(view, s)
        except pdu.DecodeError as bad:
            self._reject(_bhs(view, s), bad.reason, str(bad))
            return
        try:
            if op == 0x05:  # Data-Out
                assert isinstance(decoded, pdu.DataOut)
                self.transfer.data_out(decoded, data)
            elif op in _SEQUENCED_OPS:
                self._sequenced(cast("_Sequenced", decoded), data)
            elif op == Op.LOGIN_REQ:
                assert isinstance(decoded, pdu.LoginRequest)
                self._login(decoded, bytes(data))
            else:  # SNACK: ErrorRecoveryLevel 0 has none (RFC 7143 §11.16)
                self._reject(_bhs(view, s), RejectReason.SNACK_REJECT, "SNACK at ErrorRecoveryLevel 0")
        except ProtocolError as e:
            if e.fatal:
                self._fatal(str(e))
            else:
                self._reject(_bhs(view, s), e.reason, str(e), e.data_sn)

    # -- output helpers -----------------------------------------------------------------------------------------------

    def _reject(self, bhs: bytes, reason: RejectReason, message: str, data_sn: int = 0) -> None:
        log.info("reject %s from %s: %s", reason.name, self.peer, message)
        self.box.events.append(Rejected(reason, message))
        seq = self.seq
        self.box.send(pdu.encode_reject(reason, seq.next_stat_sn(), seq.exp_cmd_sn, seq.max_cmd_sn, data_sn), bhs)

    def _fatal(self, message: str) -> None:
        log.info("closing connection from %s: %s", self.peer, message)
        self.box.events.append(Close(message))
        self._enter(Transition.FATAL)

    def _enter(self, transition: Transition) -> None:
        self.phase = TRANSITIONS[self.phase, transition]

    def take_output(self) -> list[Out]:
        box = self.box
        out, box.out = box.out, []
        return out

    @property
    def events(self) -> list[Event]:
        """Events raised and not yet taken."""
        return self.box.events

    def take_events(self) -> list[Event]:
        box = self.box
        ev, box.events = box.events, []
        return ev

    # -- login --------------------------------------------------------------------------------------------------------

    def _login(self, req: pdu.LoginRequest, data: bytes) -> None:
        if self.login.first is None:
            self.seq.start(req.cmd_sn, req.exp_stat_sn)
        seq, box = self.seq, self.box
        try:
            reply = self.login.handle(req, data)
            tsih = 0
            if reply.done:
                tsih = self._allocate_tsih()
                if not tsih:
                    raise LoginError(LoginStatus.OUT_OF_RESOURCES, "the portal's session limit is reached")
        except LoginError as e:
            target_name = self.login.target.name if self.login.target else ""
            box.events.append(LoginFailed(self.login.initiator_name, target_name, e.status, e.reason))
            bhs = pdu.encode_login_response(
                transit=False, cont=False, csg=req.csg, nsg=0, isid=req.isid, tsih=0, itt=req.itt,
                stat_sn=seq.next_stat_sn(), exp_cmd_sn=seq.exp_cmd_sn, max_cmd_sn=seq.max_cmd_sn,
                status_class=e.status_class, status_detail=e.status_detail, length=0,
            )
            box.send(bhs)
            box.events.append(Close(f"login failed: {e.reason}"))
            self._enter(Transition.LOGIN_FAILED)
            return
        text = keys.encode_text(reply.pairs)
        bhs = pdu.encode_login_response(
            transit=reply.transit, cont=False, csg=reply.csg, nsg=reply.nsg, isid=req.isid, tsih=tsih, itt=req.itt,
            stat_sn=seq.next_stat_sn(), exp_cmd_sn=seq.exp_cmd_sn, max_cmd_sn=seq.max_cmd_sn, status_class=0,
            status_detail=0, length=len(text),
        )
        box.send(bhs, text)
        if reply.done:
            result = self.login.result(tsih)
            handing_off = self.hand_off and result.target is not None
            self._full_feature(result, Transition.HAND_OFF if handing_off else Transition.LOGIN_DONE)

    def _full_feature(self, result: LoginResult, transition: Transition) -> None:
        """Enter the session's parameters (digests framing what follows, Data-In cutting, the nexus) and move on."""
        self.result = result
        self.discovery = result.discovery
        box = self.box
        p = result.params
        box.header_digest = p.header_digest
        box.data_digest = p.data_digest
        self.max_recv = p.target_max_recv_data_segment_length
        transfer = self.transfer
        transfer.negotiated(p)
        target = result.target
        if target is not None:
            self.nexus = transfer.nexus = Nexus(result.initiator_name, result.isid, target.name, self.tpgt,
                                                self.tpgt)
            self.scsi = transfer.scsi = target.scsi
        self._enter(transition)
        self.login_deadline = None
        box.events.append(LoggedIn(result))

    # -- command sequencing (RFC 7143 §4.2.2) -------------------------------------------------------------------------

    def _sequenced(self, p: _Sequenced, data: memoryview) -> None:
        seq = self.seq
        admit = seq.admit(p, p.cmd_sn, p.immediate, data)
        if admit is _ADMIT_NOW:
            self._dispatch(p, data)
            if not p.immediate:
                if seq.queued:  # tested here: a call per command for an empty dict is measurable
                    while (ready := seq.next_queued()) is not None:
                        qp, qdata = ready
                        self._dispatch(qp, memoryview(qdata))
                seq.update_window()
        elif admit is Admit.DISCARDED:
            # RFC 7143 §4.2.2.1: outside the window, the command is silently discarded.
            log.debug("discarding CmdSN %d outside [%d, %d] from %s", p.cmd_sn, seq.exp_cmd_sn, seq.max_cmd_sn,
                      self.peer)

    def _dispatch(self, p: pdu.InitiatorPdu, data: memoryview) -> None:
        if isinstance(p, pdu.ScsiCommand):
            self.transfer.command(p, data)
        elif isinstance(p, pdu.NopOut):
            self.control.nop_out(p, data)
        elif isinstance(p, pdu.TextRequest):
            assert self.result is not None
            self.control.text(p, data, self.result)
        elif isinstance(p, pdu.TaskMgmtRequest):
            self.box.events.append(TaskManagement(p))
        elif isinstance(p, pdu.LogoutRequest):
            assert self.result is not None
            if self.control.logout(p, self.result.cid):
                self.box.events.append(LoggedOut(p.reason))
                self._enter(Transition.LOGGED_OUT)
                self.box.events.append(Close("logout"))

    # -- what the portal hands back -----------------------------------------------------------------------------------

    def complete(self, task: ScsiTask, resp: ScsiResponse) -> None:
        """The SCSI layer finished ``task``. Queues Data-In and/or the SCSI Response."""
        self.transfer.complete(task, resp, self.phase is _FULL_FEATURE)

    def tmf_done(self, req: pdu.TaskMgmtRequest, response: int) -> None:
        """Queue the TMF Response once the portal has carried the function out."""
        if self.phase is Phase.FULL_FEATURE:
            self.control.tmf_done(req, response)

    def abort(self, tag: int) -> bool:
        """Forget a task (ABORT TASK and friends): no response will be sent for it. True if it existed."""
        return self.transfer.abort(tag)

    def tags_for(self, lun: int | None) -> list[int]:
        """Tags of every task of this connection (on ``lun``, when given)."""
        return self.transfer.tags_for(lun)

    # -- timers -------------------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Called periodically: login timeout, NOP-In keepalive and its timeout."""
        if self.phase is Phase.LOGIN and self.login_deadline is not None and now >= self.login_deadline:
            self._fatal("login timed out")
            return
        if self.phase is not Phase.FULL_FEATURE:
            return
        reason = self.control.keepalive(now, self.last_rx)
        if reason is not None:
            self._fatal(reason)

    def async_logout_request(self, time2retain: int = 0) -> None:
        """Ask the initiator to log out (Async Message event 1), e.g. before a forced logout or shutdown."""
        if self.phase is Phase.FULL_FEATURE:
            self.control.async_logout_request(time2retain)

    # -- hand-off between processes (lunsync.target.handoff) ----------------------------------------------------------

    def unparsed(self) -> bytes:
        """What arrived and was not parsed: after HANDED_OFF, the bytes the next owner must parse first."""
        return bytes(self.view[self.start:self.end])

    def adopt(self, result: LoginResult, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, pending: bytes,
              now: float) -> None:
        """Take over a session another process logged in: its login result and sequence numbers, then the bytes it
        received after the final Login Request (parsed here, as if they had just arrived)."""
        seq = self.seq
        seq.stat_sn, seq.exp_cmd_sn, seq.max_cmd_sn = stat_sn, exp_cmd_sn, max_cmd_sn
        self._full_feature(result, Transition.ADOPTED)
        if pending:
            if len(pending) > len(self.buf):
                self._fatal("handed-off input larger than the receive buffer")
                return
            self.view[:len(pending)] = pending
            self.start, self.end = 0, 0
            self.buffer_updated(len(pending), now)

"""The iSCSI connection state machine (RFC 7143): framing, phases, sequence numbers, R2T and Data-In.

A :class:`Connection` knows nothing of sockets. The portal hands it received bytes (into the buffer it lends) and the
time; it returns events (a SCSI task ready to run, a task-management request, a finished login, a close) and the
buffers to send. The portal runs SCSI tasks and hands their outcomes back through :meth:`Connection.complete`.
Which opcode is legal in which phase is the one table :data:`ALLOWED`; how phases change is the one table
:data:`TRANSITIONS`.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from lunsync.target import keys, pdu
from lunsync.target.directory import Directory
from lunsync.target.errors import LoginError, LoginStatus, ProtocolError
from lunsync.target.login import LoginMachine, LoginResult
from lunsync.target.pdu import Op, RejectReason
from lunsync.target.scsi.sense import CheckCondition, SenseKey
from lunsync.target.scsi.task import Nexus, ScsiPort, ScsiResponse, ScsiTask, Status, TaskAttr

log = logging.getLogger("lunsync.iscsi")

RECV_BUFFER = 1024 * 1024  # at least two of the largest PDUs we accept; see Connection.__init__
CMD_WINDOW = 128
SERIAL_HALF = 1 << 31
MASK32 = 0xFFFFFFFF
MAX_PENDING_DATA = 64 * 1024 * 1024  # per connection: write data buffered waiting on Data-Out
# ABORTED COMMAND, 4B/00 DATA PHASE ERROR (SPC-4 Annex D): how a write ends when its Data-Out sequence breaks.
DATA_PHASE_ERROR_SENSE = CheckCondition(SenseKey.ABORTED_COMMAND, (0x4B, 0x00)).sense()


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit sequence numbers."""
    return a != b and ((b - a) & MASK32) < SERIAL_HALF


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


class Phase(enum.Enum):
    LOGIN = "login"
    FULL_FEATURE = "full-feature"
    LOGGED_OUT = "logged-out"
    CLOSED = "closed"


ALLOWED: dict[Phase, frozenset[int]] = {
    Phase.LOGIN: frozenset({Op.LOGIN_REQ}),
    Phase.FULL_FEATURE: frozenset(pdu.INITIATOR_OPS - {Op.LOGIN_REQ}),
    Phase.LOGGED_OUT: frozenset(),
    Phase.CLOSED: frozenset(),
}


class Transition(enum.Enum):
    """What moves a connection from one phase to another (RFC 7143 §8.1's connection states, as lunsync has them)."""

    LOGIN_DONE = "login-done"  # the final Login Response went out with status 0
    LOGIN_FAILED = "login-failed"  # a Login Response with an error status went out
    LOGGED_OUT = "logged-out"  # a Logout Response went out
    FATAL = "fatal"  # a protocol error or timeout: close without a response


# Every phase change; a pair that is missing is a bug in this module, not the peer's doing.
TRANSITIONS: dict[tuple[Phase, Transition], Phase] = {
    (Phase.LOGIN, Transition.LOGIN_DONE): Phase.FULL_FEATURE,
    (Phase.LOGIN, Transition.LOGIN_FAILED): Phase.CLOSED,
    (Phase.FULL_FEATURE, Transition.LOGGED_OUT): Phase.LOGGED_OUT,
    **{(phase, Transition.FATAL): Phase.CLOSED for phase in Phase},
}
_FULL_FEATURE_OPS = ALLOWED[Phase.FULL_FEATURE]  # checked per PDU: an Enum key hashes in Python, so skip the dict
DISCOVERY_ALLOWED = frozenset({Op.TEXT_REQ, Op.LOGOUT_REQ, Op.NOP_OUT})
# PDUs that carry a CmdSN and so pass through the command window (RFC 7143 §4.2.2).
_SEQUENCED_OPS = frozenset(int(o) for o in (Op.SCSI_CMD, Op.NOP_OUT, Op.TEXT_REQ, Op.TMF_REQ, Op.LOGOUT_REQ))
_Sequenced = pdu.ScsiCommand | pdu.NopOut | pdu.TextRequest | pdu.TaskMgmtRequest | pdu.LogoutRequest
_ATTRS = tuple(TaskAttr(a) if a <= 4 else TaskAttr.SIMPLE for a in range(8))


# -- events -----------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Execute:
    """A SCSI task whose Data-Out is complete: run it and call :meth:`Connection.complete`."""

    task: ScsiTask


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


# -- per-task write state ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class R2TState:
    offset: int
    length: int
    received: int = 0
    next_data_sn: int = 0


@dataclass(slots=True)
class PendingWrite:
    """A write command still gathering Data-Out (RFC 7143 §4.2.4 / §11.8)."""

    task: ScsiTask
    buffer: bytearray
    received: int
    unsolicited_limit: int  # bytes the initiator may send without R2T (immediate + unsolicited Data-Out)
    unsolicited_done: bool
    next_offset: int  # next offset an R2T will ask for
    r2t_sn: int = 0
    unsolicited_data_sn: int = 0
    r2ts: dict[int, R2TState] = field(default_factory=dict)


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
    ) -> None:
        self.directory = directory
        self.peer = peer
        self.local = local  # the socket's own address: what a wildcard portal answers discovery with
        self.tpgt = tpgt
        self.phase = Phase.LOGIN
        self.login = LoginMachine(directory, tpgt=tpgt, target_limits=target_limits)
        self.result: LoginResult | None = None
        self.params: keys.NegotiatedParams | None = None
        self.nexus: Nexus | None = None
        self.scsi: ScsiPort | None = None  # the logged-in target's SCSI side; None in login and discovery
        self._allocate_tsih = allocate_tsih or (lambda: 1)
        ours = int((target_limits or {}).get("MaxRecvDataSegmentLength", "262144"))
        # Room for two whole PDUs of the largest data segment we declare, so one is always parsed in place; small
        # enough that 16 sessions stay well inside the RSS budget.
        self.buf = bytearray(max(RECV_BUFFER, 2 * (ours + 2048)))
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.header_digest = False
        self.data_digest = False
        self.out: list[Out] = []
        self.events: list[Event] = []
        self.stat_sn = 0
        self.exp_cmd_sn = 0
        self.max_cmd_sn = 0
        self.inflight = 0
        self.ttt_counter = itertools.count(1)
        self.writes: dict[int, PendingWrite] = {}
        self.dead_itts: dict[int, None] = {}  # writes ended for a broken Data-Out sequence (insertion-ordered)
        self.running: dict[int, ScsiTask] = {}  # ITT -> task handed out as Execute
        # ITT -> R2Ts sent for a write now running: its SCSI Response's ExpDataSN (RFC 7143 §11.4.8). Only writes that
        # needed R2Ts have an entry, so the common write pays one truth test of an empty dict.
        self.r2ts_sent: dict[int, int] = {}
        self.queued: dict[int, tuple[pdu.InitiatorPdu, bytes]] = {}  # CmdSN -> PDU waiting for its turn
        self.pending_bytes = 0
        self.text_continuation: dict[int, bytes] = {}  # TTT -> rest of a long Text Response
        self.text_request_buf = bytearray()
        self.login_deadline = now + login_timeout_s if login_timeout_s > 0 else None
        self.nop_interval_s = nop_interval_s
        self.nop_timeout_s = nop_timeout_s
        self.last_rx = now
        self.nop_ttt: int | None = None
        self.nop_sent_at = 0.0
        self.mrdsl_out = 8192  # what the initiator can receive; 8192 until negotiated (RFC 7143 §13.12)
        self.burst = 262144
        self.max_recv = 8192  # what we accept before negotiation completes

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
        while self.phase not in (Phase.CLOSED, Phase.LOGGED_OUT):
            avail = self.end - self.start
            if avail < pdu.BHS_LEN:
                break
            s = self.start
            bhs = view[s:s + pdu.BHS_LEN]
            dlen = pdu.data_segment_length(bhs)
            ahs = bhs[4] * 4
            limit = self.max_recv
            if dlen > limit:
                self._fatal(f"data segment of {dlen} bytes exceeds MaxRecvDataSegmentLength {limit}")
                break
            total = pdu.frame_length(bhs, self.header_digest, self.data_digest)
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
        bhs = view[s:s + pdu.BHS_LEN]
        p = s + pdu.BHS_LEN + ahs
        if self.header_digest:
            want = int.from_bytes(view[p:p + 4], "little")
            if pdu.crc32c(view[s:p]) != want:
                # RFC 7143 §7.8: a header digest error cannot be trusted even for its length: drop the connection.
                self._fatal("header digest error")
                return
            p += 4
        data = view[p:p + dlen]
        if dlen and self.data_digest:
            pad = pdu.pad_len(dlen)
            want = int.from_bytes(view[p + dlen + pad:p + dlen + pad + 4], "little")
            if pdu.crc32c(view[p:p + dlen + pad]) != want:
                self._reject(bytes(bhs), RejectReason.DATA_DIGEST_ERROR, "data digest error")
                return
        op = bhs[0] & 0x3F
        phase = self.phase
        if op not in (_FULL_FEATURE_OPS if phase is Phase.FULL_FEATURE else ALLOWED[phase]):
            if self.phase == Phase.LOGIN:
                if self.login.first is not None:
                    # A login is under way: answer "invalid during login" (RFC 7143 §11.13.5), then close.
                    first = self.login.first
                    self._send(pdu.encode_login_response(
                        transit=False, cont=False, csg=first.csg, nsg=0, isid=first.isid, tsih=0,
                        itt=int.from_bytes(bhs[16:20], "big"), stat_sn=self._next_stat_sn(),
                        exp_cmd_sn=self.exp_cmd_sn, max_cmd_sn=self.max_cmd_sn,
                        status_class=LoginStatus.INVALID_DURING_LOGIN >> 8,
                        status_detail=LoginStatus.INVALID_DURING_LOGIN & 0xFF, length=0))
                    self.events.append(LoginFailed(self.login.initiator_name, "", LoginStatus.INVALID_DURING_LOGIN,
                                                   f"opcode 0x{op:02x} during login"))
                self._fatal(f"opcode 0x{op:02x} before login completed")
            elif op == Op.LOGIN_REQ:
                self._reject(bytes(bhs), RejectReason.PROTOCOL_ERROR, "login request in full feature phase")
            else:
                self._reject(bytes(bhs), RejectReason.COMMAND_NOT_SUPPORTED, f"opcode 0x{op:02x} not supported")
            return
        if self.result is not None and self.result.discovery and op not in DISCOVERY_ALLOWED:
            self._reject(bytes(bhs), RejectReason.PROTOCOL_ERROR, "only Text, NOP and Logout in discovery sessions")
            return
        try:
            decoded = pdu.decode(bhs)
        except pdu.DecodeError as e:
            self._reject(bytes(bhs), e.reason, str(e))
            return
        try:
            if op == 0x05:  # Data-Out
                assert isinstance(decoded, pdu.DataOut)
                try:
                    self._data_out(decoded, data, bhs)
                except ProtocolError as e:
                    if not e.fatal or decoded.itt not in self.writes:
                        raise
                    self._terminate_write(decoded.itt, str(e))
            elif op in _SEQUENCED_OPS:
                self._sequenced(cast("_Sequenced", decoded), data, bhs)
            elif op == Op.LOGIN_REQ:
                assert isinstance(decoded, pdu.LoginRequest)
                self._login(decoded, bytes(data))
            else:  # SNACK: ErrorRecoveryLevel 0 has none (RFC 7143 §11.16)
                self._reject(bytes(bhs), RejectReason.SNACK_REJECT, "SNACK at ErrorRecoveryLevel 0")
        except ProtocolError as e:
            if e.fatal:
                self._fatal(str(e))
            else:
                self._reject(bytes(bhs), e.reason, str(e), e.data_sn)

    # -- output helpers -----------------------------------------------------------------------------------------------

    def _send(self, bhs: bytes, data: Out | None = None) -> None:
        self.out.extend(pdu.frame(bhs, data, self.header_digest, self.data_digest))

    def _next_stat_sn(self) -> int:
        sn = self.stat_sn
        self.stat_sn = (sn + 1) & MASK32
        return sn

    def _reject(self, bhs: bytes, reason: RejectReason, message: str, data_sn: int = 0) -> None:
        log.info("reject %s from %s: %s", reason.name, self.peer, message)
        self.events.append(Rejected(reason, message))
        self._send(pdu.encode_reject(reason, self._next_stat_sn(), self.exp_cmd_sn, self.max_cmd_sn, data_sn), bhs)

    def _fatal(self, message: str) -> None:
        log.info("closing connection from %s: %s", self.peer, message)
        self.events.append(Close(message))
        self._enter(Transition.FATAL)

    def _enter(self, transition: Transition) -> None:
        self.phase = TRANSITIONS[self.phase, transition]

    def take_output(self) -> list[Out]:
        out, self.out = self.out, []
        return out

    def take_events(self) -> list[Event]:
        ev, self.events = self.events, []
        return ev

    # -- login --------------------------------------------------------------------------------------------------------

    def _login(self, req: pdu.LoginRequest, data: bytes) -> None:
        if self.login.first is None:
            self.stat_sn = req.exp_stat_sn
            self.exp_cmd_sn = req.cmd_sn
            self.max_cmd_sn = (req.cmd_sn + CMD_WINDOW - 1) & MASK32
        try:
            reply = self.login.handle(req, data)
            tsih = 0
            if reply.done:
                tsih = self._allocate_tsih()
                if not tsih:
                    raise LoginError(LoginStatus.OUT_OF_RESOURCES, "the portal's session limit is reached")
        except LoginError as e:
            target_name = self.login.target.name if self.login.target else ""
            self.events.append(LoginFailed(self.login.initiator_name, target_name, e.status, e.reason))
            bhs = pdu.encode_login_response(
                transit=False, cont=False, csg=req.csg, nsg=0, isid=req.isid, tsih=0, itt=req.itt,
                stat_sn=self._next_stat_sn(), exp_cmd_sn=self.exp_cmd_sn, max_cmd_sn=self.max_cmd_sn,
                status_class=e.status_class, status_detail=e.status_detail, length=0,
            )
            self._send(bhs)
            self.events.append(Close(f"login failed: {e.reason}"))
            self._enter(Transition.LOGIN_FAILED)
            return
        text = keys.encode_text(reply.pairs)
        bhs = pdu.encode_login_response(
            transit=reply.transit, cont=False, csg=reply.csg, nsg=reply.nsg, isid=req.isid, tsih=tsih, itt=req.itt,
            stat_sn=self._next_stat_sn(), exp_cmd_sn=self.exp_cmd_sn, max_cmd_sn=self.max_cmd_sn, status_class=0,
            status_detail=0, length=len(text),
        )
        self._send(bhs, text)
        if reply.done:
            result = self.login.result(tsih)
            self.result = result
            p = result.params
            self.params = p
            self.header_digest = p.header_digest
            self.data_digest = p.data_digest
            self.mrdsl_out = p.max_recv_data_segment_length
            self.burst = p.max_burst_length
            self.max_recv = p.target_max_recv_data_segment_length
            target = result.target
            if target is not None:
                self.nexus = Nexus(result.initiator_name, result.isid, target.name, self.tpgt, self.tpgt)
                self.scsi = target.scsi
            self._enter(Transition.LOGIN_DONE)
            self.login_deadline = None
            self.events.append(LoggedIn(result))

    # -- command sequencing (RFC 7143 §4.2.2) -------------------------------------------------------------------------

    def _window_update(self) -> None:
        mx = (self.exp_cmd_sn + CMD_WINDOW - 1 - self.inflight) & MASK32
        if sn_lt(self.max_cmd_sn, mx):
            self.max_cmd_sn = mx

    def _sequenced(self, p: _Sequenced, data: memoryview, bhs: memoryview) -> None:
        immediate = p.immediate
        cmd_sn = p.cmd_sn
        if immediate:
            self._dispatch(p, data, bhs)
            return
        if cmd_sn == self.exp_cmd_sn:
            self.exp_cmd_sn = (cmd_sn + 1) & MASK32
            self._dispatch(p, data, bhs)
            while self.exp_cmd_sn in self.queued:
                qp, qdata = self.queued.pop(self.exp_cmd_sn)
                self.exp_cmd_sn = (self.exp_cmd_sn + 1) & MASK32
                qv = memoryview(qdata)
                self._dispatch(qp, qv, qv[0:0])
            self._window_update()
            return
        if sn_lt(self.exp_cmd_sn, cmd_sn) and sn_le(cmd_sn, self.max_cmd_sn) and len(self.queued) < CMD_WINDOW:
            self.queued[cmd_sn] = (p, bytes(data))
            return
        # RFC 7143 §4.2.2.1: outside the window, the command is silently discarded.
        log.debug("discarding CmdSN %d outside [%d, %d] from %s", cmd_sn, self.exp_cmd_sn, self.max_cmd_sn,
                  self.peer)

    def _dispatch(self, p: pdu.InitiatorPdu, data: memoryview, bhs: memoryview) -> None:
        if isinstance(p, pdu.ScsiCommand):
            self._scsi_command(p, data, bhs)
        elif isinstance(p, pdu.NopOut):
            self._nop_out(p, data)
        elif isinstance(p, pdu.TextRequest):
            self._text(p, data)
        elif isinstance(p, pdu.TaskMgmtRequest):
            self.events.append(TaskManagement(p))
        elif isinstance(p, pdu.LogoutRequest):
            self._logout(p)

    # -- SCSI commands and Data-Out -----------------------------------------------------------------------------------

    def _scsi_command(self, c: pdu.ScsiCommand, data: memoryview, bhs: memoryview) -> None:
        nexus = self.nexus
        assert nexus is not None and self.params is not None
        if c.itt in self.running or c.itt in self.writes:
            raise ProtocolError(f"ITT 0x{c.itt:08x} already in use", RejectReason.TASK_IN_PROGRESS)
        dlen = len(data)
        edtl = c.expected_length
        p = self.params
        if dlen and not c.write:
            raise ProtocolError("data segment on a command without the W bit", RejectReason.PROTOCOL_ERROR)
        if dlen and not p.immediate_data:
            raise ProtocolError("immediate data not negotiated", RejectReason.PROTOCOL_ERROR)
        if dlen > edtl and c.write:
            raise ProtocolError("immediate data longer than the expected transfer length",
                                RejectReason.PROTOCOL_ERROR)
        first_burst = min(p.first_burst_length, edtl)
        if dlen > first_burst:
            raise ProtocolError("immediate data beyond FirstBurstLength", RejectReason.PROTOCOL_ERROR)
        # An Extended CDB AHS only carries CDB bytes beyond the 16th, which only variable-length CDBs (opcode 0x7F)
        # use; lunsync registers none, so the SCSI layer answers INVALID COMMAND OPERATION CODE from byte 0 alone.
        task = ScsiTask(
            nexus, c.lun, c.cdb, c.itt, None, edtl if c.read else 0, edtl if c.write else 0,
            _ATTRS[c.attr],
        )
        self.inflight += 1
        if not c.write or edtl == 0:
            self.running[c.itt] = task
            self.events.append(Execute(task))
            return
        if dlen == edtl:
            task.data_out = bytes(data)
            self.running[c.itt] = task
            self.events.append(Execute(task))
            return
        if edtl > MAX_PENDING_DATA or (self.pending_bytes + edtl > MAX_PENDING_DATA and self.writes):
            # Out of resources: answer BUSY rather than buffer without bound. The first write of a connection is
            # capped too: its EDTL is the initiator's word, and 4 GiB of it made the fuzzer's daemon 4 GiB large
            # (no valid write exceeds the 8 MiB MAXIMUM TRANSFER LENGTH anyway).
            self.inflight -= 1
            self._respond(task, ScsiResponse(Status.BUSY))
            return
        buf = bytearray(edtl)
        buf[0:dlen] = data
        self.pending_bytes += edtl
        unsolicited = 0 if p.initial_r2t else first_burst
        w = PendingWrite(task, buf, dlen, max(unsolicited, dlen), c.final or p.initial_r2t or dlen >= unsolicited,
                         max(unsolicited, dlen))
        self.writes[c.itt] = w
        self._issue_r2ts(w)

    def _issue_r2ts(self, w: PendingWrite) -> None:
        p = self.params
        assert p is not None
        edtl = len(w.buffer)
        if not w.unsolicited_done:
            return
        # R2Ts may not begin before the unsolicited part ended (RFC 7143 §4.2.4.1); the F bit tells us it did.
        while len(w.r2ts) < p.max_outstanding_r2t and w.next_offset < edtl:
            length = min(p.max_burst_length, edtl - w.next_offset)
            ttt = next(self.ttt_counter) & 0x7FFFFFFF
            w.r2ts[ttt] = R2TState(w.next_offset, length)
            self._send(pdu.encode_r2t(w.task.tag, w.task.lun, ttt, self.stat_sn, self.exp_cmd_sn, self.max_cmd_sn,
                                      w.r2t_sn, w.next_offset, length))
            w.r2t_sn += 1
            w.next_offset += length

    def _data_out(self, d: pdu.DataOut, data: memoryview, bhs: memoryview) -> None:
        # A Data-Out that does not fit its task's sequence (DataSN, offset, length) cannot be repaired at
        # ErrorRecoveryLevel 0: the task ends with CHECK CONDITION (see _terminate_write) and the session goes on.
        # One that names no task at all is answered with Reject and otherwise ignored.
        w = self.writes.get(d.itt)
        if w is None:
            if d.itt in self.dead_itts:
                return  # the rest of a write already ended for a broken sequence
            if d.itt in self.running:
                raise ProtocolError("Data-Out after the command's data was complete", RejectReason.PROTOCOL_ERROR)
            raise ProtocolError(f"Data-Out for unknown ITT 0x{d.itt:08x}", RejectReason.INVALID_PDU_FIELD)
        n = len(data)
        end = d.buffer_offset + n
        if end > len(w.buffer):
            raise ProtocolError("Data-Out beyond the expected transfer length", fatal=True)
        if d.ttt == pdu.RSVD_TAG:
            if w.unsolicited_done or end > w.unsolicited_limit:
                raise ProtocolError("unsolicited Data-Out not allowed here", fatal=True)
            if d.data_sn != w.unsolicited_data_sn:
                raise ProtocolError("unsolicited DataSN out of order", fatal=True)
            w.unsolicited_data_sn += 1
            w.buffer[d.buffer_offset:end] = data
            w.received += n
            if d.final:
                w.unsolicited_done = True
        else:
            r = w.r2ts.get(d.ttt)
            if r is None:
                raise ProtocolError(f"Data-Out with unknown TTT 0x{d.ttt:08x}", RejectReason.INVALID_PDU_FIELD)
            if d.buffer_offset < r.offset or end > r.offset + r.length:
                raise ProtocolError("Data-Out outside its R2T", fatal=True)
            if d.data_sn != r.next_data_sn:
                raise ProtocolError("DataSN out of order", fatal=True)
            r.next_data_sn += 1
            w.buffer[d.buffer_offset:end] = data
            w.received += n
            r.received += n
            if d.final or r.received >= r.length:
                del w.r2ts[d.ttt]
        if w.received >= len(w.buffer) and not w.r2ts and w.next_offset >= len(w.buffer):
            del self.writes[d.itt]
            self.pending_bytes -= len(w.buffer)
            w.task.data_out = w.buffer
            self.running[d.itt] = w.task
            if w.r2t_sn:
                self.r2ts_sent[d.itt] = w.r2t_sn
            self.events.append(Execute(w.task))
        else:
            self._issue_r2ts(w)

    def _terminate_write(self, itt: int, message: str) -> None:
        """End a write whose Data-Out sequence broke: CHECK CONDITION, ABORTED COMMAND / DATA PHASE ERROR. Later
        Data-Out PDUs of that task are dropped without an answer, since the initiator may have more in flight."""
        log.info("ending task 0x%08x from %s: %s", itt, self.peer, message)
        w = self.writes.pop(itt)
        self.pending_bytes -= len(w.buffer)
        self.dead_itts[itt] = None
        while len(self.dead_itts) > 64:
            del self.dead_itts[next(iter(self.dead_itts))]
        self.inflight -= 1
        self._window_update()
        if w.r2t_sn:
            self.r2ts_sent[itt] = w.r2t_sn
        self._respond(w.task, ScsiResponse(Status.CHECK_CONDITION, None, DATA_PHASE_ERROR_SENSE))

    # -- completion ---------------------------------------------------------------------------------------------------

    def complete(self, task: ScsiTask, resp: ScsiResponse) -> None:
        """The SCSI layer finished ``task``. Queues Data-In and/or the SCSI Response."""
        if self.running.pop(task.tag, None) is None or self.phase is not Phase.FULL_FEATURE:
            return  # aborted, or the connection is gone
        self.inflight -= 1
        self._window_update()
        self._respond(task, resp)

    def _respond(self, task: ScsiTask, resp: ScsiResponse) -> None:
        data = resp.data
        expected = task.expected_in
        status = int(resp.status)
        if (data is not None and status == 0 and resp.sense is None and len(data) == expected
                and 0 < expected <= self.mrdsl_out and expected <= self.burst):
            # The common read: exactly what was asked for, in one Data-In PDU with the status folded in.
            stat_sn = self.stat_sn
            self.stat_sn = (stat_sn + 1) & MASK32
            bhs = pdu.encode_read_answer(task.tag, task.lun, expected, stat_sn, self.exp_cmd_sn, self.max_cmd_sn)
            if self.header_digest or self.data_digest:
                self.out.extend(pdu.frame(bhs, data, self.header_digest, self.data_digest))
            else:
                self.out.append(bhs)
                self.out.append(data)
                if expected & 3:
                    self.out.append(pdu.padding(expected))
            return
        if data is None and status == 0 and task.out_length == task.expected_out and not expected:
            # The common write: GOOD, nothing to return, and the CDB moved exactly what the initiator sent.
            stat_sn = self.stat_sn
            self.stat_sn = (stat_sn + 1) & MASK32
            r2ts = self.r2ts_sent.pop(task.tag, 0) if self.r2ts_sent else 0
            bhs = pdu.encode_scsi_response(task.tag, 0, stat_sn, self.exp_cmd_sn, self.max_cmd_sn, r2ts)
            self.out.append(bhs)
            if self.header_digest:
                self.out.append(pdu.digest_bytes(pdu.crc32c(bhs)))
            return
        over = under = False
        residual = 0
        n = len(data) if data is not None else 0
        if expected or n:
            if n > expected:
                over, residual = True, n - expected
                n = expected
            elif n < expected:
                under, residual = True, expected - n
        if n and data is not None:
            mv = data if isinstance(data, memoryview) else memoryview(data)
            assert self.params is not None
            seg = self.mrdsl_out
            burst = self.params.max_burst_length
            fold = resp.sense is None and status == Status.GOOD
            off = 0
            data_sn = 0
            while off < n:
                ln = min(seg, n - off, burst - (off % burst))
                last = off + ln >= n
                end_of_burst = last or ((off + ln) % burst == 0)
                if last and fold:
                    bhs = pdu.encode_data_in(
                        task.tag, task.lun, data_sn, off, ln, True, status=status, stat_sn=self._next_stat_sn(),
                        exp_cmd_sn=self.exp_cmd_sn, max_cmd_sn=self.max_cmd_sn, overflow=over, underflow=under,
                        residual=residual,
                    )
                else:
                    bhs = pdu.encode_data_in(task.tag, task.lun, data_sn, off, ln, end_of_burst,
                                             exp_cmd_sn=self.exp_cmd_sn, max_cmd_sn=self.max_cmd_sn)
                self._send(bhs, mv[off:off + ln])
                off += ln
                data_sn += 1
            if fold:
                return
            exp_data_sn = data_sn
        else:
            # A write's ExpDataSN is the number of R2Ts it was sent; any other command without Data-In has 0.
            exp_data_sn = self.r2ts_sent.pop(task.tag, 0) if self.r2ts_sent else 0
        sense = resp.sense
        seg_data: bytes | None = None
        if sense:
            seg_data = len(sense).to_bytes(2, "big") + sense
        if not task.expected_in and self.scsi is not None:
            # A write's residual compares the expected transfer length with what the CDB asks to move (RFC 7143
            # §11.4.5.1); the SCSI layer knows the latter, so the transport never parses a CDB.
            want = task.out_length if task.out_length >= 0 else self.scsi.data_out_length(task)
            if want is not None and want != task.expected_out:
                over, under = want > task.expected_out, want < task.expected_out
                # The field is 32 bits; a CDB may ask for up to 2**32 blocks, so saturate (found by tests/fuzz).
                residual = min(abs(want - task.expected_out), 0xFFFFFFFF)
        rsp = pdu.ScsiResponse(
            task.tag, status, self._next_stat_sn(), self.exp_cmd_sn, self.max_cmd_sn, 0, over, under, residual,
            exp_data_sn, len(seg_data) if seg_data else 0,
        )
        self._send(rsp.encode(), seg_data)

    # -- NOP, Text, Logout, TMF ---------------------------------------------------------------------------------------

    def _nop_out(self, n: pdu.NopOut, data: memoryview) -> None:
        if n.itt == pdu.RSVD_TAG:
            # The answer to our NOP-In ping (RFC 7143 §11.18.3); nothing goes back.
            if n.ttt == self.nop_ttt:
                self.nop_ttt = None
            return
        if n.ttt != pdu.RSVD_TAG:
            raise ProtocolError("NOP-Out with ITT and TTT both set", RejectReason.PROTOCOL_ERROR)
        payload = bytes(data)
        self._send(pdu.encode_nop_in(n.itt, pdu.RSVD_TAG, self._next_stat_sn(), self.exp_cmd_sn, self.max_cmd_sn,
                                     max(n.lun, 0), len(payload)), payload)

    def _text(self, t: pdu.TextRequest, data: memoryview) -> None:
        if t.ttt != pdu.RSVD_TAG:
            rest = self.text_continuation.pop(t.ttt, None)
            if rest is None:
                raise ProtocolError("Text Request with unknown TTT", RejectReason.INVALID_PDU_FIELD)
            self._text_reply(t, rest)
            return
        if t.cont:
            self.text_request_buf += data
            if len(self.text_request_buf) > 65536:
                raise ProtocolError("text request too long", RejectReason.PROTOCOL_ERROR)
            self._send(pdu.encode_text_response(final=False, cont=False, lun=0, itt=t.itt,
                                                ttt=next(self.ttt_counter) & 0x7FFFFFFF,
                                                stat_sn=self._next_stat_sn(), exp_cmd_sn=self.exp_cmd_sn,
                                                max_cmd_sn=self.max_cmd_sn, length=0))
            return
        text = bytes(self.text_request_buf) + bytes(data)
        self.text_request_buf.clear()
        try:
            pairs = keys.parse_text(text)
        except keys.TextError as e:
            raise ProtocolError(f"malformed text: {e}", RejectReason.PROTOCOL_ERROR) from None
        out: list[tuple[str, str]] = []
        offers: list[tuple[str, str]] = []
        for k, v in pairs:
            if k == "SendTargets":
                out += self._send_targets(v)
            else:
                offers.append((k, v))
        if offers:
            out += self._renegotiate(offers)
        self._text_reply(t, keys.encode_text(out))

    def _renegotiate(self, offers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Full-feature text negotiation (RFC 7143 §6.1): the same rules as at login, for the keys the phase allows;
        e.g. an initiator re-declaring its MaxRecvDataSegmentLength changes how Data-In is cut from now on."""
        assert self.params is not None
        negotiator = keys.Negotiator(self.login.target_limits, session_type=self.params.session_type,
                                     phase=keys.Phase.FULL_FEATURE, baseline=self.params)
        try:
            answers = negotiator.respond(offers)
        except keys.NegotiationError as e:
            raise ProtocolError(f"text negotiation: {e}", RejectReason.PROTOCOL_ERROR) from None
        self.params = negotiator.result()
        self.mrdsl_out = self.params.max_recv_data_segment_length
        return answers

    def _text_reply(self, t: pdu.TextRequest, payload: bytes) -> None:
        seg = self.mrdsl_out
        chunk, rest = payload[:seg], payload[seg:]
        ttt = pdu.RSVD_TAG
        if rest:
            ttt = next(self.ttt_counter) & 0x7FFFFFFF
            self.text_continuation[ttt] = rest
        self._send(pdu.encode_text_response(final=not rest, cont=bool(rest), lun=0, itt=t.itt, ttt=ttt,
                                            stat_sn=self._next_stat_sn(), exp_cmd_sn=self.exp_cmd_sn,
                                            max_cmd_sn=self.max_cmd_sn, length=len(chunk)), chunk)

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        assert self.result is not None
        initiator = self.result.initiator_name
        if value == "All":
            if not self.result.discovery:
                return [("SendTargets", "Reject")]
            targets = self.directory.visible_to(initiator)
        elif value == "":
            targets = [self.result.target] if self.result.target is not None else []
        else:
            t = self.directory.lookup(value)
            targets = [t] if t is not None and t.allows(initiator) else []
        out: list[tuple[str, str]] = []
        addresses = self.directory.target_addresses(self.local)
        for t in targets:
            out.append(("TargetName", t.name))
            out += [("TargetAddress", a) for a in addresses]
        return out

    def _logout(self, lo: pdu.LogoutRequest) -> None:
        response = 0
        if lo.reason not in (0, 1, 2):
            raise ProtocolError(f"logout reason {lo.reason}", RejectReason.INVALID_PDU_FIELD)
        if lo.reason in (1, 2) and self.result is not None and lo.cid != self.result.cid:
            response = 1  # CID not found: lunsync sessions have one connection
        if lo.reason == 2:
            response = 2  # connection recovery is not supported at ErrorRecoveryLevel 0
        self._send(pdu.encode_logout_response(lo.itt, response, self._next_stat_sn(), self.exp_cmd_sn,
                                              self.max_cmd_sn, 0, 0))
        if response == 0:
            self.events.append(LoggedOut(lo.reason))
            self._enter(Transition.LOGGED_OUT)
            self.events.append(Close("logout"))

    def tmf_done(self, req: pdu.TaskMgmtRequest, response: int) -> None:
        """Queue the TMF Response once the portal has carried the function out."""
        if self.phase is not Phase.FULL_FEATURE:
            return
        self._send(pdu.encode_tmf_response(req.itt, response, self._next_stat_sn(), self.exp_cmd_sn,
                                           self.max_cmd_sn))

    def abort(self, tag: int) -> bool:
        """Forget a task (ABORT TASK and friends): no response will be sent for it. True if it existed."""
        found = False
        if self.running.pop(tag, None) is not None:
            found = True
            self.r2ts_sent.pop(tag, None)
        w = self.writes.pop(tag, None)
        if w is not None:
            found = True
            self.pending_bytes -= len(w.buffer)
        if found:
            self.inflight -= 1
            self._window_update()
        return found

    def tags_for(self, lun: int | None) -> list[int]:
        """Tags of every task of this connection (on ``lun``, when given)."""
        tasks = list(self.running.values()) + [w.task for w in self.writes.values()]
        return [t.tag for t in tasks if lun is None or t.lun == lun]

    def cmd_sn_received(self, ref: int) -> bool:
        """True when CmdSN ``ref`` has already been received (RFC 7143 §11.5.1 ABORT TASK rule)."""
        return sn_lt(ref, self.exp_cmd_sn)

    # -- timers -------------------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Called periodically: login timeout, NOP-In keepalive and its timeout."""
        if self.phase is Phase.LOGIN and self.login_deadline is not None and now >= self.login_deadline:
            self._fatal("login timed out")
            return
        if self.phase is not Phase.FULL_FEATURE or self.nop_interval_s <= 0:
            return
        if self.nop_ttt is not None:
            if self.last_rx <= self.nop_sent_at:
                if now - self.nop_sent_at >= self.nop_timeout_s:
                    self._fatal("NOP-In keepalive timed out")
                return
            # The peer spoke after the ping, so it is alive even if it never answers pings. Re-arm: an unanswered
            # ping must not disarm the keepalive for good, or a later stall would never end (found by tests/fuzz).
            self.nop_ttt = None
        if now - self.last_rx >= self.nop_interval_s:
            self.nop_ttt = next(self.ttt_counter) & 0x7FFFFFFF
            self.nop_sent_at = now
            self._send(pdu.encode_nop_in(pdu.RSVD_TAG, self.nop_ttt, self.stat_sn, self.exp_cmd_sn,
                                         self.max_cmd_sn))

    def async_logout_request(self, time2retain: int = 0) -> None:
        """Ask the initiator to log out (Async Message event 1), e.g. before a forced logout or shutdown."""
        if self.phase is Phase.FULL_FEATURE:
            self._send(pdu.encode_async(1, self._next_stat_sn(), self.exp_cmd_sn, self.max_cmd_sn, p3=time2retain))

"""Data transfer of one connection (RFC 7143 §4.2.4, §11.7, §11.8): R2T, Data-Out gathering, Data-In, residuals.

A :class:`DataTransfer` owns every SCSI task of a connection from its SCSI Command PDU to its SCSI Response: it
gathers immediate, unsolicited and solicited Data-Out (sending R2Ts as MaxOutstandingR2T allows), hands a task whose
data is complete out as an :class:`~lunsync.target.events.Execute` event, and turns the SCSI layer's answer into
Data-In PDUs cut at the initiator's MaxRecvDataSegmentLength and MaxBurstLength, the residuals, and the SCSI Response
(ExpDataSN included). A Data-Out sequence that breaks ends its task, not the session. No I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from lunsync.target import keys, pdu
from lunsync.target.errors import ProtocolError
from lunsync.target.events import Execute, Outbox
from lunsync.target.pdu import RejectReason
from lunsync.target.scsi.sense import CheckCondition, SenseKey
from lunsync.target.scsi.task import Nexus, ScsiPort, ScsiResponse, ScsiTask, Status, TaskAttr
from lunsync.target.sequencing import MASK32, Sequencer

log = logging.getLogger("lunsync.iscsi")

MAX_PENDING_DATA: Final = 64 * 1024 * 1024  # per connection: write data buffered waiting on Data-Out
# ABORTED COMMAND, 4B/00 DATA PHASE ERROR (SPC-4 Annex D): how a write ends when its Data-Out sequence breaks.
DATA_PHASE_ERROR_SENSE: Final = CheckCondition(SenseKey.ABORTED_COMMAND, (0x4B, 0x00)).sense()
_ATTRS: Final = tuple(TaskAttr(a) if a <= 4 else TaskAttr.SIMPLE for a in range(8))


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


class DataTransfer:
    """The SCSI tasks of one connection, with their data in both directions."""

    def __init__(self, box: Outbox, seq: Sequencer[pdu.InitiatorPdu], peer: str) -> None:
        self.box = box
        self.seq = seq
        self.peer = peer
        self.params: keys.NegotiatedParams | None = None
        self.nexus: Nexus | None = None
        self.scsi: ScsiPort | None = None  # the logged-in target's SCSI side; None in login and discovery
        self.writes: dict[int, PendingWrite] = {}
        self.dead_itts: dict[int, None] = {}  # writes ended for a broken Data-Out sequence (insertion-ordered)
        self.running: dict[int, ScsiTask] = {}  # ITT -> task handed out as Execute
        # ITT -> R2Ts sent for a write now running: its SCSI Response's ExpDataSN (RFC 7143 §11.4.8). Only writes that
        # needed R2Ts have an entry, so the common write pays one truth test of an empty dict.
        self.r2ts_sent: dict[int, int] = {}
        self.pending_bytes = 0
        self.mrdsl_out = 8192  # what the initiator can receive; 8192 until negotiated (RFC 7143 §13.12)
        self.burst = 262144
        # The two keys every write consults, copied out of the (interpreted, frozen) parameters when they are set.
        self.immediate_data = False
        self.first_burst = 0

    def negotiated(self, params: keys.NegotiatedParams) -> None:
        """Login or a Text negotiation settled the parameters; Data-In is cut by them from now on."""
        self.params = params
        self.mrdsl_out = params.max_recv_data_segment_length
        self.burst = params.max_burst_length
        self.immediate_data = params.immediate_data
        self.first_burst = params.first_burst_length

    def data_out(self, d: pdu.DataOut, data: memoryview) -> None:
        """A Data-Out PDU. A broken sequence ends its task with CHECK CONDITION; a PDU naming no task raises a
        non-fatal ProtocolError (the caller answers Reject)."""
        try:
            self._data_out(d, data)
        except ProtocolError as exc:
            if not exc.fatal or d.itt not in self.writes:
                raise
            self._terminate_write(d.itt, str(exc))

    def command(self, c: pdu.ScsiCommand, data: memoryview) -> None:
        """A SCSI Command PDU in its CmdSN turn: an Execute event now, or R2Ts until its Data-Out is in."""
        nexus = self.nexus
        assert nexus is not None and self.params is not None
        if c.itt in self.running or c.itt in self.writes:
            raise ProtocolError(f"ITT 0x{c.itt:08x} already in use", RejectReason.TASK_IN_PROGRESS)
        dlen = len(data)
        edtl = c.expected_length
        p = self.params
        if dlen and not c.write:
            raise ProtocolError("data segment on a command without the W bit", RejectReason.PROTOCOL_ERROR)
        if dlen and not self.immediate_data:
            raise ProtocolError("immediate data not negotiated", RejectReason.PROTOCOL_ERROR)
        if dlen > edtl and c.write:
            raise ProtocolError("immediate data longer than the expected transfer length",
                                RejectReason.PROTOCOL_ERROR)
        first_burst = min(self.first_burst, edtl)
        if dlen > first_burst:
            raise ProtocolError("immediate data beyond FirstBurstLength", RejectReason.PROTOCOL_ERROR)
        # An Extended CDB AHS only carries CDB bytes beyond the 16th, which only variable-length CDBs (opcode 0x7F)
        # use; lunsync registers none, so the SCSI layer answers INVALID COMMAND OPERATION CODE from byte 0 alone.
        task = ScsiTask(
            nexus, c.lun, c.cdb, c.itt, None, edtl if c.read else 0, edtl if c.write else 0,
            _ATTRS[c.attr],
        )
        self.seq.inflight += 1
        if not c.write or edtl == 0:
            self.running[c.itt] = task
            self.box.events.append(Execute(task))
            return
        if dlen == edtl:
            task.data_out = bytes(data)
            self.running[c.itt] = task
            self.box.events.append(Execute(task))
            return
        if edtl > MAX_PENDING_DATA or (self.pending_bytes + edtl > MAX_PENDING_DATA and self.writes):
            # Out of resources: answer BUSY rather than buffer without bound. The first write of a connection is
            # capped too: its EDTL is the initiator's word, and 4 GiB of it made the fuzzer's daemon 4 GiB large
            # (no valid write exceeds the 8 MiB MAXIMUM TRANSFER LENGTH anyway).
            self.seq.inflight -= 1
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
            ttt = self.seq.next_ttt()
            w.r2ts[ttt] = R2TState(w.next_offset, length)
            seq = self.seq
            self.box.send(pdu.encode_r2t(w.task.tag, w.task.lun, ttt, seq.stat_sn, seq.exp_cmd_sn, seq.max_cmd_sn,
                                      w.r2t_sn, w.next_offset, length))
            w.r2t_sn += 1
            w.next_offset += length

    def _data_out(self, d: pdu.DataOut, data: memoryview) -> None:
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
            self.box.events.append(Execute(w.task))
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
        self.seq.task_done()
        if w.r2t_sn:
            self.r2ts_sent[itt] = w.r2t_sn
        self._respond(w.task, ScsiResponse(Status.CHECK_CONDITION, None, DATA_PHASE_ERROR_SENSE))

    # -- completion ---------------------------------------------------------------------------------------------------

    def complete(self, task: ScsiTask, resp: ScsiResponse, live: bool) -> None:
        """The SCSI layer finished ``task``: queue its Data-In and/or SCSI Response, unless it was aborted or the
        connection is no longer ``live``."""
        running = self.running
        tag = task.tag
        # ``in`` and ``del`` are compiled dict operations; ``pop`` with a default is a method call.
        if tag not in running:
            return
        del running[tag]
        if not live:
            return
        seq = self.seq
        seq.inflight -= 1  # Sequencer.task_done, inlined: this runs for every command
        seq.update_window()
        self._respond(task, resp)

    def _respond(self, task: ScsiTask, resp: ScsiResponse) -> None:
        data = resp.data
        expected = task.expected_in
        status = int(resp.status)
        if (data is not None and status == 0 and resp.sense is None and len(data) == expected
                and 0 < expected <= self.mrdsl_out and expected <= self.burst):
            # The common read: exactly what was asked for, in one Data-In PDU with the status folded in.
            seq = self.seq
            stat_sn = seq.stat_sn
            seq.stat_sn = (stat_sn + 1) & MASK32
            bhs = pdu.encode_read_answer(task.tag, task.lun, expected, stat_sn, seq.exp_cmd_sn, seq.max_cmd_sn)
            box = self.box
            if box.header_digest or box.data_digest:
                box.out.extend(pdu.frame(bhs, data, box.header_digest, box.data_digest))
            else:
                out = box.out
                out.append(bhs)
                out.append(data)
                if expected & 3:
                    out.append(pdu.padding(expected))
            return
        if data is None and status == 0 and task.out_length == task.expected_out and not expected:
            # The common write: GOOD, nothing to return, and the CDB moved exactly what the initiator sent.
            seq = self.seq
            stat_sn = seq.stat_sn
            seq.stat_sn = (stat_sn + 1) & MASK32
            r2ts = self.r2ts_sent.pop(task.tag, 0) if self.r2ts_sent else 0
            bhs = pdu.encode_scsi_response(task.tag, 0, stat_sn, seq.exp_cmd_sn, seq.max_cmd_sn, r2ts)
            box = self.box
            box.out.append(bhs)
            if box.header_digest:
                box.out.append(pdu.digest_bytes(pdu.crc32c(bhs)))
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
                        task.tag, task.lun, data_sn, off, ln, True, status=status, stat_sn=self.seq.next_stat_sn(),
                        exp_cmd_sn=self.seq.exp_cmd_sn, max_cmd_sn=self.seq.max_cmd_sn, overflow=over, underflow=under,
                        residual=residual,
                    )
                else:
                    bhs = pdu.encode_data_in(task.tag, task.lun, data_sn, off, ln, end_of_burst,
                                             exp_cmd_sn=self.seq.exp_cmd_sn, max_cmd_sn=self.seq.max_cmd_sn)
                self.box.send(bhs, mv[off:off + ln])
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
            task.tag, status, self.seq.next_stat_sn(), self.seq.exp_cmd_sn, self.seq.max_cmd_sn, 0, over, under, residual,
            exp_data_sn, len(seg_data) if seg_data else 0,
        )
        self.box.send(rsp.encode(), seg_data)

    # -- task management ----------------------------------------------------------------------------------------------

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
            self.seq.task_done()
        return found

    def tags_for(self, lun: int | None) -> list[int]:
        """Tags of every task of this connection (on ``lun``, when given)."""
        tasks = list(self.running.values()) + [w.task for w in self.writes.values()]
        return [t.tag for t in tasks if lun is None or t.lun == lun]

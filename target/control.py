"""The requests of a connection that are not SCSI (RFC 7143 §11.10-11.11, §11.14-11.15, §11.18-11.19): Text with
SendTargets and full-feature renegotiation, Logout, NOP-Out/NOP-In and the keepalive, TMF responses.

:class:`Control` answers each of them through the connection's :class:`~lunsync.target.events.Outbox`, numbered by
its :class:`~lunsync.target.sequencing.Sequencer`. It decides, the connection changes phase: a logout that succeeds
is reported back, and a keepalive that timed out returns the reason to close. The clock is passed in. No I/O.
"""

from __future__ import annotations

from lunsync.target import keys, pdu
from lunsync.target.directory import Directory
from lunsync.target.errors import ProtocolError
from lunsync.target.events import Outbox
from lunsync.target.login import LoginResult
from lunsync.target.pdu import RejectReason
from lunsync.target.sequencing import Sequencer
from lunsync.target.transfer import DataTransfer

MAX_TEXT_REQUEST = 65536  # a Text Request gathered over C-bit PDUs may not grow beyond this


class Control:
    """Text, Logout, NOP and TMF answers of one connection."""

    def __init__(self, box: Outbox, seq: Sequencer[pdu.InitiatorPdu], transfer: DataTransfer, directory: Directory,
                 *, local: tuple[str, int] | None, target_limits: dict[str, str], nop_interval_s: float,
                 nop_timeout_s: float) -> None:
        self.box = box
        self.seq = seq
        self.transfer = transfer  # renegotiation changes how it cuts Data-In
        self.directory = directory
        self.local = local  # the socket's own address: what a wildcard portal answers discovery with
        self.target_limits = target_limits
        self.nop_interval_s = nop_interval_s
        self.nop_timeout_s = nop_timeout_s
        self.text_continuation: dict[int, bytes] = {}  # TTT -> rest of a long Text Response
        self.text_request_buf = bytearray()
        self.nop_ttt: int | None = None
        self.nop_sent_at = 0.0

    # -- NOP ------------------------------------------------------------------------------------------------------------

    def nop_out(self, n: pdu.NopOut, data: memoryview) -> None:
        if n.itt == pdu.RSVD_TAG:
            # The answer to our NOP-In ping (RFC 7143 §11.18.3); nothing goes back.
            if n.ttt == self.nop_ttt:
                self.nop_ttt = None
            return
        if n.ttt != pdu.RSVD_TAG:
            raise ProtocolError("NOP-Out with ITT and TTT both set", RejectReason.PROTOCOL_ERROR)
        payload = bytes(data)
        seq = self.seq
        self.box.send(pdu.encode_nop_in(n.itt, pdu.RSVD_TAG, seq.next_stat_sn(), seq.exp_cmd_sn, seq.max_cmd_sn,
                                        max(n.lun, 0), len(payload)), payload)

    def keepalive(self, now: float, last_rx: float) -> str | None:
        """Ping an idle initiator with NOP-In; the reason to close when a ping went unanswered too long."""
        if self.nop_interval_s <= 0:
            return None
        if self.nop_ttt is not None:
            if last_rx <= self.nop_sent_at:
                if now - self.nop_sent_at >= self.nop_timeout_s:
                    return "NOP-In keepalive timed out"
                return None
            # The peer spoke after the ping, so it is alive even if it never answers pings. Re-arm: an unanswered
            # ping must not disarm the keepalive for good, or a later stall would never end (found by tests/fuzz).
            self.nop_ttt = None
        if now - last_rx >= self.nop_interval_s:
            self.nop_ttt = self.seq.next_ttt()
            self.nop_sent_at = now
            seq = self.seq
            self.box.send(pdu.encode_nop_in(pdu.RSVD_TAG, self.nop_ttt, seq.stat_sn, seq.exp_cmd_sn, seq.max_cmd_sn))
        return None

    # -- Text ---------------------------------------------------------------------------------------------------------

    def text(self, t: pdu.TextRequest, data: memoryview, result: LoginResult) -> None:
        if t.ttt != pdu.RSVD_TAG:
            rest = self.text_continuation.pop(t.ttt, None)
            if rest is None:
                raise ProtocolError("Text Request with unknown TTT", RejectReason.INVALID_PDU_FIELD)
            self._text_reply(t, rest)
            return
        seq = self.seq
        if t.cont:
            self.text_request_buf += data
            if len(self.text_request_buf) > MAX_TEXT_REQUEST:
                raise ProtocolError("text request too long", RejectReason.PROTOCOL_ERROR)
            self.box.send(pdu.encode_text_response(final=False, cont=False, lun=0, itt=t.itt, ttt=seq.next_ttt(),
                                                   stat_sn=seq.next_stat_sn(), exp_cmd_sn=seq.exp_cmd_sn,
                                                   max_cmd_sn=seq.max_cmd_sn, length=0))
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
                out += self._send_targets(v, result)
            else:
                offers.append((k, v))
        if offers:
            out += self._renegotiate(offers)
        self._text_reply(t, keys.encode_text(out))

    def _renegotiate(self, offers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Full-feature text negotiation (RFC 7143 §6.1): the same rules as at login, for the keys the phase allows;
        e.g. an initiator re-declaring its MaxRecvDataSegmentLength changes how Data-In is cut from now on."""
        params = self.transfer.params
        assert params is not None
        negotiator = keys.Negotiator(self.target_limits, session_type=params.session_type,
                                     phase=keys.Phase.FULL_FEATURE, baseline=params)
        try:
            answers = negotiator.respond(offers)
        except keys.NegotiationError as e:
            raise ProtocolError(f"text negotiation: {e}", RejectReason.PROTOCOL_ERROR) from None
        self.transfer.negotiated(negotiator.result())
        return answers

    def _text_reply(self, t: pdu.TextRequest, payload: bytes) -> None:
        seg = self.transfer.mrdsl_out
        chunk, rest = payload[:seg], payload[seg:]
        seq = self.seq
        ttt = pdu.RSVD_TAG
        if rest:
            ttt = seq.next_ttt()
            self.text_continuation[ttt] = rest
        self.box.send(pdu.encode_text_response(final=not rest, cont=bool(rest), lun=0, itt=t.itt, ttt=ttt,
                                               stat_sn=seq.next_stat_sn(), exp_cmd_sn=seq.exp_cmd_sn,
                                               max_cmd_sn=seq.max_cmd_sn, length=len(chunk)), chunk)

    def _send_targets(self, value: str, result: LoginResult) -> list[tuple[str, str]]:
        initiator = result.initiator_name
        if value == "All":
            if not result.discovery:
                return [("SendTargets", "Reject")]
            targets = self.directory.visible_to(initiator)
        elif value == "":
            targets = [result.target] if result.target is not None else []
        else:
            t = self.directory.lookup(value)
            targets = [t] if t is not None and t.allows(initiator) else []
        out: list[tuple[str, str]] = []
        addresses = self.directory.target_addresses(self.local)
        for t in targets:
            out.append(("TargetName", t.name))
            out += [("TargetAddress", a) for a in addresses]
        return out

    # -- Logout, TMF, Async ---------------------------------------------------------------------------------------------

    def logout(self, lo: pdu.LogoutRequest, cid: int) -> bool:
        """Answer a Logout Request on connection ``cid``; True when the connection is now logged out."""
        response = 0
        if lo.reason not in (0, 1, 2):
            raise ProtocolError(f"logout reason {lo.reason}", RejectReason.INVALID_PDU_FIELD)
        if lo.reason in (1, 2) and lo.cid != cid:
            response = 1  # CID not found: lunsync sessions have one connection
        if lo.reason == 2:
            response = 2  # connection recovery is not supported at ErrorRecoveryLevel 0
        seq = self.seq
        self.box.send(pdu.encode_logout_response(lo.itt, response, seq.next_stat_sn(), seq.exp_cmd_sn,
                                                 seq.max_cmd_sn, 0, 0))
        return response == 0

    def tmf_done(self, req: pdu.TaskMgmtRequest, response: int) -> None:
        seq = self.seq
        self.box.send(pdu.encode_tmf_response(req.itt, response, seq.next_stat_sn(), seq.exp_cmd_sn, seq.max_cmd_sn))

    def async_logout_request(self, time2retain: int) -> None:
        seq = self.seq
        self.box.send(pdu.encode_async(1, seq.next_stat_sn(), seq.exp_cmd_sn, seq.max_cmd_sn, p3=time2retain))

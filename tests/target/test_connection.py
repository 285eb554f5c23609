"""The connection state machine driven with bytes and a clock only: login, full feature phase, R2T, Data-In,
NOP, Text/SendTargets, task management events, Reject and logout. No socket anywhere."""

from __future__ import annotations

import struct

import pytest
from lunsync.target import chap, keys, pdu
from lunsync.target.connection import (
    TRANSITIONS,
    Close,
    Connection,
    Execute,
    LoggedIn,
    LoginFailed,
    Phase,
    TaskManagement,
    Transition,
)
from lunsync.target.directory import ChapCredentials, Directory, PortalAddress, TargetEntry
from lunsync.target.scsi.task import ScsiResponse, Status

from tests.target.scsi.memdev import MemDevice, make_target, run

IQN = "iqn.2026-11.io.lunsync:test"
INITIATOR = "iqn.2026-11.org.example:host1"
ISID = 0x23D000000001


def login_pdu(pairs: list[tuple[str, str]], *, csg: int = 1, nsg: int = 3, transit: bool = True, itt: int = 0,
              cmd_sn: int = 1, cont: bool = False, tsih: int = 0) -> bytes:
    data = keys.encode_text(pairs)
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    bhs = struct.pack(">BBBBB3s6sHIHxxII16x", 0x43, flags, 0, 0, 0, len(data).to_bytes(3, "big"),
                      ISID.to_bytes(6, "big"), tsih, itt, 0, cmd_sn, 0)
    return bhs + data + pdu.padding(len(data))


def scsi_cmd(cdb: bytes, *, itt: int, cmd_sn: int, edtl: int, read: bool = False, write: bool = False,
             data: bytes = b"", final: bool = True, lun: int = 0) -> bytes:
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 1
    bhs = struct.pack(">BBxxB3s8sIIII16s", 0x01, flags, 0, len(data).to_bytes(3, "big"), pdu.encode_lun(lun), itt,
                      edtl, cmd_sn, 0, cdb.ljust(16, b"\0"))
    return bhs + data + pdu.padding(len(data))


def data_out(data: bytes, *, itt: int, ttt: int, offset: int, data_sn: int = 0, final: bool = True) -> bytes:
    bhs = struct.pack(">BBxxB3s8sIIIIIII4x", 0x05, 0x80 if final else 0, 0, len(data).to_bytes(3, "big"),
                      pdu.encode_lun(0), itt, ttt, 0, 0, 0, data_sn, offset)
    return bhs + data + pdu.padding(len(data))


def split(out: list[pdu.Out]) -> list[tuple[bytes, bytes]]:
    """Parse what the target sent back into (BHS, data) pairs."""
    raw = b"".join(bytes(x) for x in out)
    pdus = []
    while raw:
        n = pdu.frame_length(raw, False, False)
        dlen = pdu.data_segment_length(raw)
        pdus.append((raw[:48], raw[48:48 + dlen]))
        raw = raw[n:]
    return pdus


class Rig:
    def __init__(self, *, chap_creds: ChapCredentials | None = None, acl: frozenset[str] = frozenset()) -> None:
        self.dev = MemDevice(num_blocks=2048)
        scsi, self.lu, _ = make_target(self.dev)
        self.directory = Directory()
        self.directory.add(TargetEntry(IQN, scsi, alias="t", acl=acl, chap=chap_creds))
        self.directory.portals.append(PortalAddress("127.0.0.1", 3260, 1))
        self.events: list[object] = []
        self.conn = Connection(self.directory, peer="test", now=0.0, nop_interval_s=5, nop_timeout_s=5,
                               target_limits={"MaxRecvDataSegmentLength": "65536"})

    def feed(self, data: bytes, now: float = 1.0) -> list[tuple[bytes, bytes]]:
        view = self.conn.get_buffer()
        view[:len(data)] = data
        self.conn.buffer_updated(len(data), now)
        self.run_events()
        return split(self.conn.take_output())

    def run_events(self) -> None:
        for ev in self.conn.take_events():
            if isinstance(ev, Execute):
                resp: ScsiResponse = run(self.conn.result.target.scsi.execute(ev.task))  # type: ignore[union-attr]
                self.conn.complete(ev.task, resp)
            else:
                self.events.append(ev)

    def login(self, extra: list[tuple[str, str]] | None = None) -> list[tuple[bytes, bytes]]:
        self.events = []
        pairs = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Normal"),
                 ("ImmediateData", "Yes"), ("InitialR2T", "Yes"), ("MaxBurstLength", "65536"),
                 ("FirstBurstLength", "8192")] + (extra or [])
        out = self.feed(login_pdu(pairs))
        if self.conn.phase is Phase.FULL_FEATURE:
            # The first command of a new I_T nexus reports POWER ON OCCURRED; take it out of the way.
            self.feed(scsi_cmd(bytes(6), itt=0xFFFF, cmd_sn=1, edtl=0))
        return out


def test_single_pdu_login_reaches_full_feature_phase() -> None:
    rig = Rig()
    [(bhs, data)] = rig.login()
    assert bhs[0] == 0x23 and bhs[36] == 0 and bhs[37] == 0
    assert bhs[1] & 0x80 and bhs[1] & 3 == 3  # T bit, NSG = full feature
    tsih = int.from_bytes(bhs[14:16], "big")
    assert tsih != 0
    answers = dict(keys.parse_text(data))
    assert answers["TargetPortalGroupTag"] == "1"
    assert answers["MaxRecvDataSegmentLength"] == "65536"
    assert rig.conn.phase is Phase.FULL_FEATURE
    assert any(isinstance(e, LoggedIn) for e in rig.events)


def test_unknown_target_fails_login_with_not_found() -> None:
    rig = Rig()
    out = rig.feed(login_pdu([("InitiatorName", INITIATOR), ("TargetName", "iqn.2026-11.io.lunsync:nope")]))
    assert out[0][0][36:38] == bytes((0x02, 0x03))
    assert any(isinstance(e, Close) for e in rig.conn.take_events()) or rig.conn.phase is Phase.CLOSED


def test_acl_refusal_is_authorization_failure() -> None:
    rig = Rig(acl=frozenset({"iqn.2026-11.org.example:other"}))
    [(bhs, _)] = rig.login()
    assert bhs[36:38] == bytes((0x02, 0x02))
    assert any(isinstance(e, LoginFailed) and e.reason.startswith("initiator not in the ACL") for e in rig.events)


def test_chap_login_in_three_steps() -> None:
    secret = "verysecretpassword"
    rig = Rig(chap_creds=ChapCredentials("alice", secret))
    first = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP,None")]
    [(bhs, data)] = rig.feed(login_pdu(first, csg=0, nsg=1))
    assert dict(keys.parse_text(data))["AuthMethod"] == "CHAP"
    assert not bhs[1] & 0x80  # the target holds the security stage
    [(bhs, data)] = rig.feed(login_pdu([("CHAP_A", "7,5")], csg=0, nsg=1, transit=False))
    d = dict(keys.parse_text(data))
    assert d["CHAP_A"] == "7"
    resp = chap.chap_response(7, int(d["CHAP_I"]), secret.encode(), chap.decode_binary(d["CHAP_C"]))
    [(bhs, data)] = rig.feed(login_pdu([("CHAP_N", "alice"), ("CHAP_R", chap.encode_binary(resp))], csg=0, nsg=1))
    assert bhs[36] == 0 and bhs[1] & 0x80
    [(bhs, _)] = rig.feed(login_pdu([("HeaderDigest", "None")], csg=1, nsg=3))
    assert bhs[36] == 0 and rig.conn.phase is Phase.FULL_FEATURE


def test_wrong_chap_secret_is_authentication_failure() -> None:
    rig = Rig(chap_creds=ChapCredentials("alice", "verysecretpassword"))
    rig.feed(login_pdu([("InitiatorName", INITIATOR), ("TargetName", IQN), ("AuthMethod", "CHAP")], csg=0, nsg=1))
    [(_, data)] = rig.feed(login_pdu([("CHAP_A", "5")], csg=0, nsg=1, transit=False))
    d = dict(keys.parse_text(data))
    bad = chap.chap_response(5, int(d["CHAP_I"]), b"wrong-secret-123", chap.decode_binary(d["CHAP_C"]))
    [(bhs, _)] = rig.feed(login_pdu([("CHAP_N", "alice"), ("CHAP_R", chap.encode_binary(bad))], csg=0, nsg=1))
    assert bhs[36:38] == bytes((0x02, 0x01))
    assert rig.conn.phase is Phase.CLOSED


def test_skipping_security_when_chap_is_required_fails() -> None:
    rig = Rig(chap_creds=ChapCredentials("alice", "verysecretpassword"))
    [(bhs, _)] = rig.login()
    assert bhs[36:38] == bytes((0x02, 0x01))


def test_read_returns_data_in_with_status_folded() -> None:
    rig = Rig()
    rig.login()
    rig.dev.data[512:1024] = b"\xab" * 512
    out = rig.feed(scsi_cmd(bytes((0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0)), itt=5, cmd_sn=2, edtl=512, read=True))
    [(bhs, data)] = out
    assert bhs[0] == 0x25 and bhs[1] & 0x81 == 0x81  # F and S
    assert data == b"\xab" * 512
    assert int.from_bytes(bhs[24:28], "big") == rig.conn.stat_sn - 1


def test_read_underflow_sets_residual() -> None:
    rig = Rig()
    rig.login()
    [(bhs, data)] = rig.feed(scsi_cmd(bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0)), itt=6, cmd_sn=2, edtl=1024,
                                      read=True))
    assert len(data) == 512 and bhs[1] & 0x02 and int.from_bytes(bhs[44:48], "big") == 512


def test_write_residuals_compare_the_cdb_with_the_expected_length() -> None:
    # Exact (the fast path: no flags, no residual), then the CDB moving less (underflow) and more (overflow) than
    # the initiator's Expected Data Transfer Length (RFC 7143 §11.4.5.1).
    rig = Rig()
    rig.login()
    cases = [(1, 512, 0x80, 0), (1, 1024, 0x82, 512), (2, 512, 0x84, 512)]
    for n, (blocks, edtl, flags, residual) in enumerate(cases):
        cdb = bytes((0x2A, 0, 0, 0, 0, 8, 0, 0, blocks, 0))
        [(bhs, data)] = rig.feed(scsi_cmd(cdb, itt=20 + n, cmd_sn=2 + n, edtl=edtl, write=True,
                                          data=b"\x5a" * edtl))
        assert bhs[0] == 0x21 and bhs[3] == 0 and data == b""
        assert bhs[1] == flags and int.from_bytes(bhs[44:48], "big") == residual
        assert int.from_bytes(bhs[16:20], "big") == 20 + n
    assert rig.dev.data[8 * 512:9 * 512] == b"\x5a" * 512


def test_write_beyond_first_burst_gets_r2t_then_completes() -> None:
    rig = Rig()
    rig.login()
    payload = bytes(range(256)) * 64  # 16 KiB, twice FirstBurstLength
    cdb = bytes((0x2A, 0, 0, 0, 0, 8, 0, 0, 32, 0))
    out = rig.feed(scsi_cmd(cdb, itt=7, cmd_sn=2, edtl=len(payload), write=True, data=payload[:8192]))
    [(r2t, _)] = out
    assert r2t[0] == 0x31
    ttt = int.from_bytes(r2t[20:24], "big")
    assert int.from_bytes(r2t[40:44], "big") == 8192 and int.from_bytes(r2t[44:48], "big") == 8192
    [(rsp, _)] = rig.feed(data_out(payload[8192:], itt=7, ttt=ttt, offset=8192))
    assert rsp[0] == 0x21 and rsp[3] == Status.GOOD
    # ExpDataSN of a write's SCSI Response is the number of R2Ts the target sent for it (RFC 7143 §11.4.8).
    assert int.from_bytes(rsp[36:40], "big") == 1
    assert bytes(rig.dev.data[8 * 512:8 * 512 + len(payload)]) == payload


def test_data_out_with_unknown_ttt_is_rejected() -> None:
    rig = Rig()
    rig.login()
    cdb = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 32, 0))
    rig.feed(scsi_cmd(cdb, itt=8, cmd_sn=2, edtl=16384, write=True, data=b"\0" * 8192))
    out = rig.feed(data_out(b"\0" * 512, itt=8, ttt=0x1234, offset=8192))
    kinds = [b[0] for b, _ in out]
    assert 0x3F in kinds  # Reject
    rej = next(b for b, _ in out if b[0] == 0x3F)
    assert rej[2] == pdu.RejectReason.INVALID_PDU_FIELD


def test_cmd_sn_outside_window_is_silently_dropped() -> None:
    rig = Rig()
    rig.login()
    out = rig.feed(scsi_cmd(bytes(6), itt=9, cmd_sn=rig.conn.max_cmd_sn + 1, edtl=0))
    assert out == []


def test_nop_out_ping_is_echoed() -> None:
    rig = Rig()
    rig.login()
    bhs = struct.pack(">BBxxB3s8sIIII16x", 0x40, 0x80, 0, (4).to_bytes(3, "big"), bytes(8), 0x77, 0xFFFFFFFF, 2, 0)
    [(rsp, data)] = rig.feed(bhs + b"ping")
    assert rsp[0] == 0x20 and int.from_bytes(rsp[16:20], "big") == 0x77 and data == b"ping"


def test_nop_in_keepalive_then_timeout() -> None:
    rig = Rig()
    rig.login()
    rig.conn.tick(10.0)
    [(nop, _)] = split(rig.conn.take_output())
    assert nop[0] == 0x20 and int.from_bytes(nop[16:20], "big") == 0xFFFFFFFF
    rig.conn.tick(20.0)
    assert rig.conn.phase is Phase.CLOSED


def test_unanswered_ping_does_not_disarm_the_keepalive() -> None:
    """An initiator that keeps talking but never answers a ping is alive; when it later goes silent, a new ping
    and its timeout must still close the connection (a stalled connection otherwise stayed open for ever)."""
    rig = Rig()
    rig.login()
    rig.conn.tick(10.0)
    [(nop, _)] = split(rig.conn.take_output())
    assert nop[0] == 0x20
    ping = struct.pack(">BBxxB3s8sIIII16x", 0x40, 0x80, 0, bytes(3), bytes(8), 0x78, 0xFFFFFFFF, 2, 0)
    rig.feed(ping, now=12.0)  # other traffic, not the ping's answer
    rig.conn.tick(16.0)  # alive: no timeout though the ping's TTT was never echoed
    assert rig.conn.phase is not Phase.CLOSED
    rig.conn.tick(18.0)  # idle for nop_interval_s since 12.0: a new ping
    assert [b[0] for b, _ in split(rig.conn.take_output())] == [0x20]
    rig.conn.tick(24.0)
    assert rig.conn.phase is Phase.CLOSED


def test_send_targets_in_discovery_session() -> None:
    rig = Rig()
    rig.events = []
    rig.feed(login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]))
    text = keys.encode_text([("SendTargets", "All")])
    bhs = struct.pack(">BBxxB3s8sIIII16x", 0x04, 0x80, 0, len(text).to_bytes(3, "big"), bytes(8), 3, 0xFFFFFFFF,
                      1, 0)
    [(rsp, data)] = rig.feed(bhs + text + pdu.padding(len(text)))
    assert rsp[0] == 0x24
    assert keys.parse_text(data) == [("TargetName", IQN), ("TargetAddress", "127.0.0.1:3260,1")]


def test_scsi_command_in_discovery_session_is_rejected() -> None:
    rig = Rig()
    rig.feed(login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]))
    out = rig.feed(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
    assert out[0][0][0] == 0x3F


def test_task_management_becomes_an_event() -> None:
    rig = Rig()
    rig.login()
    bhs = struct.pack(">BBxxB3s8sIIIIII8x", 0x02, 0x80 | 5, 0, b"\0\0\0", pdu.encode_lun(0), 0x55, 0xFFFFFFFF, 2,
                      0, 0, 0)
    rig.feed(bhs)
    assert any(isinstance(e, TaskManagement) and e.request.function == 5 for e in rig.events)


def test_logout_answers_and_closes() -> None:
    rig = Rig()
    rig.login()
    bhs = struct.pack(">BBxxB3s8xIHxxII16x", 0x06, 0x80, 0, b"\0\0\0", 0x99, 0, 2, 0)
    [(rsp, _)] = rig.feed(bhs)
    assert rsp[0] == 0x26 and rsp[2] == 0
    assert rig.conn.phase is Phase.LOGGED_OUT


def test_pdu_before_login_closes_the_connection() -> None:
    rig = Rig()
    rig.feed(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
    assert rig.conn.phase is Phase.CLOSED


def test_oversized_data_segment_closes_the_connection() -> None:
    rig = Rig()
    rig.login()
    bhs = bytearray(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
    bhs[5:8] = (1 << 20).to_bytes(3, "big")
    rig.feed(bytes(bhs[:48]))
    assert rig.conn.phase is Phase.CLOSED


def test_login_split_at_every_byte_still_succeeds() -> None:
    raw = login_pdu([("InitiatorName", INITIATOR), ("TargetName", IQN)])
    rig = Rig()
    out: list[tuple[bytes, bytes]] = []
    for i in range(len(raw)):
        out += rig.feed(raw[i:i + 1])
    assert len(out) == 1 and out[0][0][36] == 0
    assert rig.conn.phase is Phase.FULL_FEATURE


def test_completion_after_abort_sends_nothing() -> None:
    rig = Rig()
    rig.login()
    view = rig.conn.get_buffer()
    raw = scsi_cmd(bytes((0x00,) * 6), itt=42, cmd_sn=2, edtl=0)
    view[:len(raw)] = raw
    rig.conn.buffer_updated(len(raw), 1.0)
    [ev] = [e for e in rig.conn.take_events() if isinstance(e, Execute)]
    assert rig.conn.abort(42)
    rig.conn.complete(ev.task, ScsiResponse(Status.GOOD))
    assert rig.conn.take_output() == []
    assert run(rig.dev.close()) is None


def test_broken_data_sn_ends_the_write_with_aborted_command() -> None:
    rig = Rig()
    rig.login()
    cdb = bytes((0x2A, 0, 0, 0, 0, 0, 0, 0, 32, 0))
    [(r2t, _)] = rig.feed(scsi_cmd(cdb, itt=11, cmd_sn=2, edtl=16384, write=True, data=b"\0" * 8192))
    ttt = int.from_bytes(r2t[20:24], "big")
    [(rsp, sense)] = rig.feed(data_out(b"\1" * 4096, itt=11, ttt=ttt, offset=8192, data_sn=5, final=False))
    assert rsp[0] == 0x21 and rsp[3] == Status.CHECK_CONDITION
    assert sense[2 + 2] & 0x0F == 0x0B and sense[2 + 12:2 + 14] == bytes((0x4B, 0x00))
    assert int.from_bytes(rsp[36:40], "big") == 1  # the one R2T it was sent (RFC 7143 §11.4.8)
    assert rig.feed(data_out(b"\1" * 4096, itt=11, ttt=ttt, offset=12288, data_sn=1)) == []  # dropped silently
    assert rig.conn.phase is Phase.FULL_FEATURE
    assert bytes(rig.dev.data[0:16384]) == bytes(16384)  # nothing of the broken write reached the LUN


def test_empty_data_in_becomes_a_scsi_response() -> None:
    """A zero-length transfer (e.g. READ CAPACITY(16) with ALLOCATION LENGTH 0) is answered with a SCSI Response,
    never an empty Data-In, which libiscsi waits on forever."""
    rig = Rig()
    rig.login()
    cdb = bytes((0x9E, 0x10)) + bytes(12) + bytes(2)
    [(rsp, _)] = rig.feed(scsi_cmd(cdb, itt=12, cmd_sn=2, edtl=0, read=True))
    assert rsp[0] == 0x21 and rsp[3] == Status.GOOD


def test_session_limit_refuses_the_login_with_out_of_resources() -> None:
    rig = Rig()
    rig.conn._allocate_tsih = lambda: 0  # what the portal answers once max_sessions sessions exist
    [(bhs, _)] = rig.login()
    assert bhs[36:38] == bytes((0x03, 0x02))
    assert rig.conn.phase is Phase.CLOSED
    assert any(isinstance(e, LoginFailed) and "session limit" in e.reason for e in rig.events)


def test_text_renegotiation_of_max_recv_data_segment_length_cuts_data_in() -> None:
    rig = Rig()
    rig.login()
    text = keys.encode_text([("MaxRecvDataSegmentLength", "4096"), ("X-com.example.Foo", "1")])
    bhs = struct.pack(">BBxxB3s8sIIII16x", 0x04, 0x80, 0, len(text).to_bytes(3, "big"), bytes(8), 21, 0xFFFFFFFF,
                      2, 0)
    [(rsp, data)] = rig.feed(bhs + text + pdu.padding(len(text)))
    assert rsp[0] == 0x24 and dict(keys.parse_text(data)).get("X-com.example.Foo") == "NotUnderstood"
    out = rig.feed(scsi_cmd(bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 16, 0)), itt=22, cmd_sn=3, edtl=8192, read=True))
    assert [len(d) for _, d in out] == [4096, 4096] and out[1][0][1] & 0x01  # status on the last of the two


def test_phase_table_closes_from_every_phase_and_leaves_closed_only_by_nothing() -> None:
    assert all(TRANSITIONS[p, Transition.FATAL] is Phase.CLOSED for p in Phase)
    assert {t for (p, t) in TRANSITIONS if p is Phase.CLOSED} == {Transition.FATAL}
    rig = Rig()
    rig.login()
    assert rig.conn.phase is Phase.FULL_FEATURE
    with pytest.raises(KeyError):
        rig.conn._enter(Transition.LOGIN_DONE)  # a second login completion is a bug, never a silent phase change

"""A session logged in by one connection and carried on by another, as between the control process and a worker:
what the first stops at, what travels, and that the second answers the commands pipelined behind the login."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lunsync.target.connection import Connection, Execute, LoggedIn, Phase
from lunsync.target.directory import Directory, TargetEntry
from lunsync.target.errors import LoginStatus
from lunsync.target.handoff import HandOffError, SessionState, adopt, capture, refusal

from tests.target.scsi.memdev import run
from tests.target.test_connection import INITIATOR, IQN, ISID, Rig, login_pdu, scsi_cmd, split

LOGIN = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Normal"), ("ImmediateData", "Yes"),
         ("MaxRecvDataSegmentLength", "16384")]
READ_8_BLOCKS = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0))


def control_side(rig: Rig) -> Connection:
    return Connection(rig.directory, peer="10.0.0.1:5000", now=0.0, target_limits={"MaxRecvDataSegmentLength": "65536"},
                      allocate_tsih=lambda: 7, hand_off=True)


def feed(conn: Connection, data: bytes) -> None:
    view = conn.get_buffer()
    view[:len(data)] = data
    conn.buffer_updated(len(data), 1.0)


def test_login_stops_at_handed_off_and_leaves_pipelined_commands_unparsed() -> None:
    rig = Rig()
    conn = control_side(rig)
    behind = scsi_cmd(READ_8_BLOCKS, itt=5, cmd_sn=1, edtl=4096, read=True)
    feed(conn, login_pdu(LOGIN) + behind)
    assert conn.phase is Phase.HANDED_OFF
    events = conn.take_events()
    assert [type(e) for e in events] == [LoggedIn]  # no Execute: the command is the next owner's
    [(rsp, _)] = split(conn.take_output())
    assert rsp[0] == 0x23 and rsp[1] & 0x83 == 0x83 and int.from_bytes(rsp[14:16], "big") == 7
    assert conn.unparsed() == behind


def test_discovery_sessions_stay_with_the_portal() -> None:
    rig = Rig()
    conn = control_side(rig)
    feed(conn, login_pdu([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]))
    assert conn.phase is Phase.FULL_FEATURE
    with pytest.raises(HandOffError):
        capture(conn, b"")


def test_the_adopting_connection_sends_the_login_answer_and_runs_what_was_pipelined() -> None:
    rig = Rig()
    conn = control_side(rig)
    behind = scsi_cmd(bytes(6), itt=4, cmd_sn=1, edtl=0) + scsi_cmd(READ_8_BLOCKS, itt=5, cmd_sn=2, edtl=4096,
                                                                       read=True)
    feed(conn, login_pdu(LOGIN) + behind)
    out = b"".join(bytes(b) for b in conn.take_output())
    state = capture(conn, out)
    # What travels is JSON: the worker sees exactly what the control had.
    state = SessionState.from_wire(json.loads(json.dumps(state.to_wire())))
    assert (state.tsih, state.isid, state.target_name, state.outgoing, state.pending) == (7, ISID, IQN, out, behind)
    login_stat_sn = int.from_bytes(out[24:28], "big")

    worker_dir = Directory()
    worker_dir.add(TargetEntry(IQN, rig.directory.targets[IQN].scsi))
    worker = Connection(worker_dir, peer=state.peer, now=0.0)
    adopt(worker, state, worker_dir, 2.0)
    assert worker.phase is Phase.FULL_FEATURE and worker.result is not None and worker.result.tsih == 7
    assert worker.params == state.params
    events = worker.take_events()
    assert isinstance(events[0], LoggedIn)
    tasks = [e.task for e in events if isinstance(e, Execute)]
    assert [t.tag for t in tasks] == [4, 5]
    scsi = worker_dir.targets[IQN].scsi
    for t in tasks:
        worker.complete(t, run(scsi.execute(t)))
    replies = split(worker.take_output())
    tur, (data_in, payload) = replies
    assert tur[0][0] == 0x21 and int.from_bytes(tur[0][24:28], "big") == login_stat_sn + 1
    assert data_in[0] == 0x25 and len(payload) == 4096 and int.from_bytes(data_in[24:28], "big") == login_stat_sn + 2
    assert int.from_bytes(data_in[28:32], "big") == 3  # ExpCmdSN moved past both commands


def test_a_target_the_worker_does_not_serve_is_refused() -> None:
    rig = Rig()
    conn = control_side(rig)
    feed(conn, login_pdu(LOGIN))
    state = capture(conn, b"")
    with pytest.raises(HandOffError, match="not served here"):
        adopt(Connection(Directory()), state, Directory(), 0.0)


def test_bad_wire_forms_are_hand_off_errors() -> None:
    rig = Rig()
    conn = control_side(rig)
    feed(conn, login_pdu(LOGIN))
    good = capture(conn, b"").to_wire()
    for bad in ({**good, "tsih": "7"}, {**good, "isid": True}, {**good, "pending": "***"},
                {k: v for k, v in good.items() if k != "cid"}, {**good, "extra": 1},
                {**good, "params": {**good["params"], "header_digest": 1}}, {**good, "stat_sn": -1}, [good]):
        with pytest.raises(HandOffError):
            SessionState.from_wire(bad)
    assert SessionState.from_wire(good) == capture(conn, b"")


@given(st.dictionaries(st.text(max_size=20), st.none() | st.integers() | st.text() | st.booleans(), max_size=20))
def test_garbage_is_a_hand_off_error_or_nothing_else(d: dict[str, object]) -> None:
    try:
        SessionState.from_wire(d)
    except HandOffError:
        pass


def test_digests_framing_is_carried() -> None:
    rig = Rig()
    conn = control_side(rig)
    feed(conn, login_pdu(LOGIN + [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]))
    state = capture(conn, b"")
    assert state.params.header_digest and state.params.data_digest
    worker = Connection(rig.directory)
    adopt(worker, state, rig.directory, 0.0)
    assert worker.box.header_digest and worker.box.data_digest


def test_the_refusal_answers_the_final_login_request_in_place_of_its_response() -> None:
    rig = Rig()
    conn = control_side(rig)
    feed(conn, login_pdu(LOGIN, itt=0x1234))
    out = b"".join(bytes(b) for b in conn.take_output())
    state = capture(conn, out)
    [(rsp, data)] = split([refusal(state, LoginStatus.SERVICE_UNAVAILABLE)])
    assert rsp[0] == 0x23 and rsp[1] & 0x80 == 0 and data == b""  # no T bit: the login does not complete
    assert (rsp[36], rsp[37]) == (0x03, 0x01) and int.from_bytes(rsp[14:16], "big") == 0  # no TSIH
    assert rsp[16:20] == out[16:20] == (0x1234).to_bytes(4, "big") and rsp[24:36] == out[24:36]  # ITT, SNs
    with pytest.raises(HandOffError):
        refusal(capture(conn, b""), LoginStatus.SERVICE_UNAVAILABLE)

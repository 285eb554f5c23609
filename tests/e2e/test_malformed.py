"""Malformed and out-of-order PDUs, built with scapy, against the live daemon.

Each test breaks one rule of RFC 7143 on its own connection and asserts the answer the RFC asks for (a Reject with
its reason code, a Login Response with its status, silence, or a closed connection). After each one the daemon must
still be healthy: a new normal login works, and a session that was logged in before the abuse (the *bystander*) still
reads back what it writes. One daemon serves the whole module.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from e2e.harness import DEMO_IQN, Daemon, require_tools
from iscsi_scapy import (
    BHS,
    BHS_LEN,
    RESERVED_TAG,
    ConnectionClosed,
    DataOut,
    LoginResponse,
    LoginStatus,
    LogoutRequest,
    NopIn,
    NopOut,
    RawInitiator,
    Reject,
    RejectReason,
    ScsiCommand,
    Stage,
    TextRequest,
    cdb_test_unit_ready,
    cdb_write10,
    encode_lun,
    login_request,
    summaries,
    text_kv,
)

pytestmark = pytest.mark.e2e

UNDEFINED_OPCODE = 0x1F  # an initiator opcode RFC 7143 §11.2.1.2 leaves unassigned
SILENCE_S = 1.0  # how long "no answer" is waited for
_isids = itertools.count(0x400000A00000)


def new_isid() -> int:
    return next(_isids)


def logged_in(daemon: Daemon, **kwargs: object) -> RawInitiator:
    ini = RawInitiator("127.0.0.1", daemon.port).connect()
    ini.login(DEMO_IQN, initiator="iqn.2026-11.io.lunsync:malformed", isid=new_isid(), **kwargs)  # type: ignore[arg-type]
    return ini


def until_ready(ini: RawInitiator) -> None:
    """TEST UNIT READY until GOOD; the first command of a new I_T nexus may legitimately see a UNIT ATTENTION."""
    for _ in range(3):
        r = ini.test_unit_ready()
        if r.status == 0:
            return
        assert r.status == 0x02 and r.sense_key == 0x6, f"TUR: status 0x{r.status:02x} sense {r.sense.hex()}"
    raise AssertionError("TEST UNIT READY never became GOOD")


class Bystander:
    """A session logged in before the abuse starts; it must never notice."""

    def __init__(self, daemon: Daemon) -> None:
        self.ini = RawInitiator("127.0.0.1", daemon.port)
        self.ini.connect()
        self.ini.login(DEMO_IQN, initiator="iqn.2026-11.io.lunsync:bystander", isid=0x400000B00001)
        until_ready(self.ini)
        self.blocks, self.block_size = self.ini.read_capacity()
        self.rounds = 0

    def check(self) -> None:
        # Far from LBA 0, where the abusing connections might write.
        lba = self.blocks // 2 + (self.rounds % 64) * 16
        self.rounds += 1
        data = os.urandom(8 * self.block_size)
        w = self.ini.write10(lba, data, self.block_size)
        assert w.status == 0, f"bystander WRITE: status 0x{w.status:02x} sense {w.sense.hex()}"
        r = self.ini.read10(lba, 8, self.block_size)
        assert r.status == 0 and r.data == data, "bystander read back something else"
        assert self.ini.nop(b"still-here").data == b"still-here"


@pytest.fixture(scope="module")
def daemon(demo_daemon: Daemon) -> Daemon:
    return demo_daemon


@pytest.fixture(scope="module")
def bystander(daemon: Daemon) -> Iterator[Bystander]:
    b = Bystander(daemon)
    yield b
    b.ini.close()


@pytest.fixture(autouse=True)
def target_survives(daemon: Daemon, bystander: Bystander) -> Iterator[None]:
    """After every test: the daemon is up with no escaped exception, a new login works, the bystander is fine."""
    yield
    daemon.assert_healthy()
    with logged_in(daemon) as ini:
        until_ready(ini)
        assert ini.nop(b"ping").data == b"ping"
    bystander.check()


def raw_connection(daemon: Daemon) -> RawInitiator:
    return RawInitiator("127.0.0.1", daemon.port).connect()


def start_login(ini: RawInitiator) -> LoginResponse:
    """Begin a login without finishing it: security stage, T=0, so the target must answer and stay in login."""
    ini.send(login_request(target=DEMO_IQN, isid=new_isid(), operational=False, transit=False, nsg=Stage.SECURITY))
    rsp = ini.recv_pdu()
    assert isinstance(rsp, LoginResponse) and rsp.status == LoginStatus.SUCCESS, summaries([rsp])
    assert not rsp.transit, "the target transited although the initiator did not ask to (RFC 7143 §11.13.3)"
    return rsp


def assert_rejected(pdus: list[BHS], reason: int, sent: bytes) -> Reject:
    rejects = [p for p in pdus if isinstance(p, Reject)]
    assert rejects, f"expected a Reject (reason 0x{reason:02x}), got {summaries(pdus)}"
    rj = rejects[0]
    assert rj.reason == reason, f"Reject reason 0x{rj.reason:02x}, want 0x{reason:02x}"
    assert rj.itt == RESERVED_TAG, "a Reject carries ITT 0xffffffff (RFC 7143 §11.17)"
    assert rj.rejected_header == sent[:BHS_LEN], "a Reject carries the complete header of the bad PDU (§11.17)"
    return rj


# --- before and during login ------------------------------------------------------------------------------------------

FIRST_PDUS = {
    "scsi-command": lambda: ScsiCommand(flags=0x81, itt=1, cmd_sn=1, cdb=cdb_test_unit_ready().ljust(16, b"\0")),
    "nop-out": lambda: NopOut(immediate=1, itt=1, cmd_sn=1, data=b"hello"),
    "text-request": lambda: TextRequest(itt=1, cmd_sn=1, data=text_kv({"SendTargets": "All"})),
    "logout": lambda: LogoutRequest(itt=1, cmd_sn=1),
    "data-out": lambda: DataOut(itt=1, data=b"\0" * 512),
    "undefined-opcode": lambda: BHS(opcode=UNDEFINED_OPCODE, itt=1),
}


@pytest.mark.parametrize("kind", FIRST_PDUS)
def test_non_login_pdu_before_login_closes_the_connection(daemon: Daemon, kind: str) -> None:
    """RFC 7143 §6.3: a target receiving any PDU except a Login Request before the Login Phase is started MUST
    immediately terminate the connection. Nothing is answered, and nothing is executed."""
    with raw_connection(daemon) as ini:
        ini.send(FIRST_PDUS[kind]())
        got = ini.expect_closed(timeout=5)
        assert got == [], f"answered a pre-login {kind}: {summaries(got)}"


@pytest.mark.parametrize("kind", ["scsi-command", "nop-out", "text-request", "undefined-opcode"])
def test_non_login_pdu_during_login_gets_invalid_during_login(daemon: Daemon, kind: str) -> None:
    """RFC 7143 §6.3: once the Login Phase has started, any PDU except a Login Request gets a Login reject with
    status "Invalid during login" (0x020b), then the connection is closed."""
    with raw_connection(daemon) as ini:
        start_login(ini)
        ini.send(FIRST_PDUS[kind]())
        got = ini.expect_closed(timeout=5)
        assert got, "closed the connection without the Login reject (0x020b) RFC 7143 §6.3 requires"
        assert len(got) == 1 and isinstance(got[0], LoginResponse), f"got {summaries(got)}"
        assert got[0].status == LoginStatus.INVALID_DURING_LOGIN, f"status 0x{got[0].status:04x}"


def test_login_with_lying_length_never_answered_and_closed_on_eof(daemon: Daemon, bystander: Bystander) -> None:
    """A Login Request whose DataSegmentLength promises more than is sent is not a PDU yet: the target must not act
    on it, must not stall other sessions while waiting, and must close when the initiator gives up (FIN)."""
    with raw_connection(daemon) as ini:
        wire = bytes(login_request(target=DEMO_IQN, isid=new_isid()))
        header = bytearray(wire[:BHS_LEN])
        header[5:8] = (len(wire) - BHS_LEN + 400).to_bytes(3, "big")
        ini.send(bytes(header) + wire[BHS_LEN:])
        with pytest.raises(TimeoutError):
            ini.recv_pdu(timeout=SILENCE_S)
        bystander.check()  # the half-received PDU holds up nobody else
        assert ini.sock is not None
        ini.sock.shutdown(socket.SHUT_WR)
        assert ini.expect_closed(timeout=5) == []


def test_login_with_wrong_version_is_refused(daemon: Daemon) -> None:
    """RFC 7143 §11.12.4/§11.13.5: a Version-min above what the target supports gets "Unsupported version"."""
    with raw_connection(daemon) as ini:
        req = login_request(target=DEMO_IQN, isid=new_isid())
        req.version_max = req.version_min = 0x7F
        ini.send(req)
        got = ini.expect_closed(timeout=5)
        assert len(got) == 1 and isinstance(got[0], LoginResponse), summaries(got)
        assert got[0].status == LoginStatus.UNSUPPORTED_VERSION, f"status 0x{got[0].status:04x}"


def test_login_to_unknown_target_is_not_found(daemon: Daemon) -> None:
    """RFC 7143 §11.13.5: a TargetName the portal does not serve gets 0x0203 "Not found"."""
    with raw_connection(daemon) as ini:
        ini.send(login_request(target="iqn.2026-11.io.lunsync:no-such-target", isid=new_isid()))
        got = ini.expect_closed(timeout=5)
        assert len(got) == 1 and isinstance(got[0], LoginResponse), summaries(got)
        assert got[0].status == LoginStatus.NOT_FOUND, f"status 0x{got[0].status:04x}"


def test_login_without_initiator_name_is_missing_parameter(daemon: Daemon) -> None:
    """RFC 7143 §13.5.1: InitiatorName MUST be sent on the first Login Request; without it, 0x0207."""
    with raw_connection(daemon) as ini:
        req = login_request(target=DEMO_IQN, isid=new_isid())
        req.data = b"".join(kv + b"\0" for kv in bytes(req.data).split(b"\0") if kv and
                            not kv.startswith(b"InitiatorName="))
        ini.send(req)
        got = ini.expect_closed(timeout=5)
        assert len(got) == 1 and isinstance(got[0], LoginResponse), summaries(got)
        assert got[0].status == LoginStatus.MISSING_PARAMETER, f"status 0x{got[0].status:04x}"


# --- full feature phase -----------------------------------------------------------------------------------------------


def test_undefined_opcode_in_full_feature_phase_is_rejected(daemon: Daemon) -> None:
    """An opcode the target does not implement gets Reject "Command not supported" (RFC 7143 §11.17.1); the
    connection stays usable."""
    with logged_in(daemon) as ini:
        bad = bytes(BHS(opcode=UNDEFINED_OPCODE, itt=0x77, opcode_specific1=ini.cmd_sn.to_bytes(4, "big") * 7))
        ini.send(bad)
        assert_rejected(ini.drain(SILENCE_S), RejectReason.COMMAND_NOT_SUPPORTED, bad)
        assert ini.nop(b"after").data == b"after"


def test_data_segment_longer_than_sent_is_never_answered(daemon: Daemon, bystander: Bystander) -> None:
    """A NOP-Out ping whose DataSegmentLength exceeds the bytes sent is incomplete: no NOP-In may come back, other
    sessions go on, and the target closes once the initiator half-closes."""
    with logged_in(daemon) as ini:
        ping = NopOut(immediate=1, itt=0x51, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn, data=b"x" * 100,
                      data_segment_length=1000)
        ini.send(ping)
        with pytest.raises(TimeoutError):
            ini.recv_pdu(timeout=SILENCE_S)
        bystander.check()
        assert ini.sock is not None
        ini.sock.shutdown(socket.SHUT_WR)
        got = ini.expect_closed(timeout=5)
        assert not [p for p in got if isinstance(p, NopIn)], f"answered an incomplete ping: {summaries(got)}"


def test_data_segment_shorter_than_sent_frames_by_the_header(daemon: Daemon) -> None:
    """Framing follows DataSegmentLength (RFC 7143 §11.2.1): bytes beyond it are the next PDU. Here they are a
    second, valid ping, so both pings are answered, in order, each echoing exactly its own data."""
    with logged_in(daemon) as ini:
        inner = NopOut(immediate=1, itt=0x62, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn, data=b"inner!!!")
        outer = NopOut(immediate=1, itt=0x61, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn,
                       data=b"outer!!!" + bytes(inner), data_segment_length=8)
        ini.send(outer)
        first, second = ini.recv_pdu(), ini.recv_pdu()
        assert isinstance(first, NopIn) and first.itt == 0x61 and first.data == b"outer!!!", summaries([first])
        assert isinstance(second, NopIn) and second.itt == 0x62 and second.data == b"inner!!!", summaries([second])
        assert ini.nop(b"after").data == b"after"


def _oversize_outcome(ini: RawInitiator, sent: bytes) -> None:
    """RFC 7143 §13.12: a PDU larger than the receiver's MaxRecvDataSegmentLength is a protocol error. Acceptable:
    a Reject "Protocol Error" with the connection still framed and usable, or the connection closed. Never an
    answer that treats the PDU as valid."""
    try:
        got = ini.drain(SILENCE_S)
    except ConnectionClosed:
        got = []
    bad = [p for p in got if not isinstance(p, Reject)]
    assert not bad, f"acted on an oversized PDU: {summaries(bad)}"
    if ini.is_closed(timeout=0.2):
        return
    assert_rejected(got, RejectReason.PROTOCOL_ERROR, sent)
    assert ini.nop(b"after").data == b"after", "connection unusable after the Reject"


def test_ping_beyond_max_recv_data_segment_length(daemon: Daemon) -> None:
    with logged_in(daemon) as ini:
        size = ini.target_mrdsl + 4096
        ping = bytes(NopOut(immediate=1, itt=0x71, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn,
                            data=os.urandom(size)))
        ini.send(ping)
        _oversize_outcome(ini, ping)


def test_immediate_data_beyond_max_recv_data_segment_length(daemon: Daemon) -> None:
    with logged_in(daemon) as ini:
        until_ready(ini)
        size = (ini.target_mrdsl // 512 + 8) * 512
        cmd = bytes(ScsiCommand(flags=0xA1, itt=0x72, lun=encode_lun(0), expected_data_transfer_length=size,
                                cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn,
                                cdb=cdb_write10(0, size // 512).ljust(16, b"\0"), data=os.urandom(size)))
        ini.send(cmd)
        _oversize_outcome(ini, cmd)


def test_huge_declared_segment_is_refused_without_waiting_for_it(daemon: Daemon) -> None:
    """A header announcing 16 MiB - 1 of data, far above MaxRecvDataSegmentLength, must be refused on sight (Reject
    or close) rather than buffered: a target that waits for it lets any peer pin 16 MiB per connection."""
    with logged_in(daemon) as ini:
        hdr = bytes(NopOut(immediate=1, itt=0x73, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn,
                           data_segment_length=0xFFFFFF))[:BHS_LEN]
        ini.send(hdr)
        try:
            got = ini.drain(SILENCE_S)
        except ConnectionClosed:
            got = []
        closed = ini.is_closed(timeout=0.2)
        assert closed or any(isinstance(p, Reject) for p in got), "silently waits for a 16 MiB data segment"
        assert not [p for p in got if not isinstance(p, Reject)], summaries(got)


@pytest.mark.parametrize("where", ["above-max-cmd-sn", "below-exp-cmd-sn"])
def test_out_of_window_cmd_sn_is_silently_ignored(daemon: Daemon, where: str) -> None:
    """RFC 7143 §4.2.2.1: the target MUST silently ignore any non-immediate command outside [ExpCmdSN, MaxCmdSN].
    The ignored command must not run, and must not move ExpCmdSN."""
    with logged_in(daemon) as ini:
        until_ready(ini)
        before = ini.read10(0, 1).data
        exp = ini.exp_cmd_sn
        bad_sn = (ini.max_cmd_sn + 1) & 0xFFFFFFFF if where == "above-max-cmd-sn" else (exp - 1) & 0xFFFFFFFF
        marker = os.urandom(512)
        # A WRITE, so that running it would be visible: LBA 0 would change.
        ini.send(ScsiCommand(flags=0xA1, itt=0x81, lun=encode_lun(0), expected_data_transfer_length=512,
                             cmd_sn=bad_sn, exp_stat_sn=ini.exp_stat_sn, cdb=cdb_write10(0, 1).ljust(16, b"\0"),
                             data=marker))
        got = ini.drain(SILENCE_S)
        assert got == [], f"answered an out-of-window command: {summaries(got)}"
        assert ini.cmd_sn == exp, "test bookkeeping: the next good CmdSN is ExpCmdSN"
        r = ini.read10(0, 1)
        assert r.status == 0 and r.data == before, "the out-of-window WRITE was executed"
        assert r.response.exp_cmd_sn == (exp + 1) & 0xFFFFFFFF, (
            f"ExpCmdSN {r.response.exp_cmd_sn}, want {exp + 1}: the ignored command moved the window")


def test_bad_data_digest_is_rejected_and_connection_survives(daemon: Daemon) -> None:
    """RFC 7143 §7.8: a data digest error gets Reject "Data (payload) digest error" (0x02) and the PDU is discarded;
    the connection goes on."""
    with logged_in(daemon, extra={"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"}) as ini:
        if not ini.data_digest_on:
            pytest.skip(f"the target declined DataDigest=CRC32C ({ini.target_keys.get('DataDigest')})")
        ping = NopOut(immediate=1, itt=0x91, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn, data=b"digest!!")
        wire = bytearray(bytes(ping.with_digests(ini.header_digest_on, True)))
        wire[-1] ^= 0xFF  # the data digest is the last word
        ini.send(bytes(wire))
        got = ini.drain(SILENCE_S)
        assert not [p for p in got if isinstance(p, NopIn)], "answered a ping whose data digest is wrong"
        assert_rejected(got, RejectReason.DATA_DIGEST_ERROR, bytes(wire))
        assert ini.nop(b"after").data == b"after"


def test_bad_header_digest_closes_the_connection(daemon: Daemon) -> None:
    """RFC 7143 §7.8: after a header digest error the length cannot be trusted; without a sync layer the only safe
    move is to close the connection, answering nothing."""
    with logged_in(daemon, extra={"HeaderDigest": "CRC32C"}) as ini:
        if not ini.header_digest_on:
            pytest.skip(f"the target declined HeaderDigest=CRC32C ({ini.target_keys.get('HeaderDigest')})")
        ping = NopOut(immediate=1, itt=0x92, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn, data=b"hd",
                      header_digest=0xDEADBEEF)
        ini.send(bytes(ping.with_digests(True, ini.data_digest_on)))
        assert ini.expect_closed(timeout=5) == []


# --- garbage ----------------------------------------------------------------------------------------------------------


def _only_target_pdus_then_close(ini: RawInitiator) -> list[BHS]:
    """Half-close, then everything received must parse as target PDUs, and the target must close."""
    assert ini.sock is not None
    try:
        ini.sock.shutdown(socket.SHUT_WR)
    except OSError:
        return []  # already reset by the target
    return ini.expect_closed(timeout=5)


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes_before_login(daemon: Daemon, seed: int) -> None:
    """Garbage instead of a Login Request: the target may only answer with a failed Login Response, then closes."""
    rng = random.Random(seed)
    with raw_connection(daemon) as ini:
        try:
            ini.send(rng.randbytes(rng.choice([1, 47, 48, 200, 4096, 70000])))
        except (BrokenPipeError, ConnectionResetError):
            return
        got = _only_target_pdus_then_close(ini)
        for p in got:
            assert isinstance(p, LoginResponse) and p.status_class != 0, f"answered garbage with {summaries([p])}"


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes_after_login(daemon: Daemon, seed: int) -> None:
    """Garbage in full feature phase: whatever comes back must be well-formed target PDUs, and the connection
    closes when the initiator does."""
    rng = random.Random(1000 + seed)
    with logged_in(daemon) as ini:
        try:
            ini.send(rng.randbytes(rng.choice([1, 48, 100, 1000, 9000])))
        except (BrokenPipeError, ConnectionResetError):
            return
        _only_target_pdus_then_close(ini)


def test_random_headers_with_valid_framing(daemon: Daemon) -> None:
    """Random 48-byte headers with an honest, small DataSegmentLength and no AHS: each is either answered with
    well-formed target PDUs or ends the connection; a fresh connection is used after each close."""
    rng = random.Random(4242)
    ini = logged_in(daemon)
    try:
        for _ in range(200):
            hdr = bytearray(rng.randbytes(BHS_LEN))
            dlen = rng.choice([0, 0, 4, 13, 512])
            hdr[0] &= 0x7F
            hdr[4] = 0
            hdr[5:8] = dlen.to_bytes(3, "big")
            try:
                ini.send(bytes(hdr) + rng.randbytes(dlen) + bytes((-dlen) % 4))
                ini.drain(0.02)
            except (ConnectionClosed, BrokenPipeError, ConnectionResetError):
                pass
            if ini.is_closed(timeout=0.01):
                ini.close()
                ini = logged_in(daemon)
    finally:
        ini.close()


# --- a real initiator next door ---------------------------------------------------------------------------------------


def test_qemu_io_verify_runs_through_a_storm_of_garbage(daemon: Daemon) -> None:
    """A qemu-io session writes and verifies 32 MiB while other connections throw garbage at the same portal."""
    require_tools("qemu-io")
    url = daemon.url(0)
    cmd = ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 64M 32M", "-c", "read -P 0x5a 64M 32M", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    stop = threading.Event()

    def storm() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            try:
                with raw_connection(daemon) as ini:
                    if rng.random() < 0.5:
                        ini.login(DEMO_IQN, initiator="iqn.2026-11.io.lunsync:storm", isid=new_isid())
                    ini.send(rng.randbytes(rng.choice([48, 300, 5000])))
                    ini.drain(0.01)
            except (OSError, ConnectionClosed, AssertionError, TimeoutError):
                pass

    t = threading.Thread(target=storm, daemon=True)
    t.start()
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        stop.set()
        t.join(10)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Pattern verification failed" not in out, out
    assert out.count("ops/sec") == 2, out
    time.sleep(0.1)


DATASN_CASES = {  # the DataSN sequences libiscsi's iSCSIDataSnInvalid sends, for one- and two-PDU writes
    "two-zeros": [0, 0],
    "starts-at-27": [27],
    "minus-one": [0xFFFFFFFF],
    "reversed": [1, 0],
}


@pytest.mark.parametrize("solicited", [True, False], ids=["after-r2t", "unsolicited"])
@pytest.mark.parametrize("case", DATASN_CASES)
def test_wrong_data_sn_never_completes_good(daemon: Daemon, case: str, solicited: bool) -> None:
    """RFC 7143 §11.7.5: DataSN counts the Data-Out PDUs of a sequence from 0. A write whose Data-Out carries any
    other DataSN must not complete with GOOD status: Reject, CHECK CONDITION or a dropped connection are all fine."""
    sns = DATASN_CASES[case]
    keys = {"ImmediateData": "No", "InitialR2T": "Yes" if solicited else "No"}
    with logged_in(daemon, extra=keys) as ini:
        until_ready(ini)
        if not solicited and ini.param("InitialR2T", "Yes") != "No":
            pytest.skip("the target insists on InitialR2T=Yes")
        itt = ini.next_itt()
        size = 512 * len(sns)
        # F=0 on the command announces that unsolicited Data-Out follows (RFC 7143 §11.3.1).
        ini.send(ScsiCommand(flags=0xA1 if solicited else 0x21, itt=itt, lun=encode_lun(0),
                             expected_data_transfer_length=size, cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn,
                             cdb=cdb_write10(100, len(sns)).ljust(16, b"\0")))
        ini.cmd_sn += 1
        ttt = RESERVED_TAG
        if solicited:
            r2t = ini.recv_pdu()
            assert r2t.opcode == 0x31 and r2t.itt == itt, summaries([r2t])
            ttt = r2t.ttt
        ini.send([DataOut(flags=0x80 if i == len(sns) - 1 else 0, lun=encode_lun(0), itt=itt, ttt=ttt,
                          exp_stat_sn=ini.exp_stat_sn, data_sn=sn, buffer_offset=512 * i, data=b"\xa6" * 512)
                  for i, sn in enumerate(sns)])
        got = ini.drain(SILENCE_S)
        good = [p for p in got if p.itt == itt and getattr(p, "status", None) == 0 and p.opcode in (0x21, 0x25)]
        assert not good, f"DataSN {sns} accepted: {summaries(got)}"

"""Each refusal the array promises, against the real daemon, and the metric that proves it was counted.

Issue 7's acceptance list, one test each: a wrong CHAP secret, the CHAP reflection attack (the initiator hands the
target its own challenge in mutual CHAP, hoping to have the target compute the response for it), an initiator outside
a target's ACL, an EXTENDED COPY that names another target's LUN by its NAA (the lesson of CVE-2020-28374 in LIO:
the copy manager must resolve copy targets only among the requester's own LUNs), and an API call without a token.
Each must be refused on the wire and raise its counter on ``/metrics``. The CHAP exchanges are driven by hand with
the raw initiator so every key is under the test's control. Last come the secrets: never in the daemon's log, and
every file holding one is mode 0600. One daemon serves the module; the tarpit test gets its own.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator

import httpx
import pytest
from e2e.auth_targets import AuthTargets
from e2e.harness import Daemon
from iscsi_scapy import LoginRequest, LoginResponse, LoginStatus, RawInitiator, Stage, login_request, text_kv

pytestmark = pytest.mark.e2e

CHAP_IQN = "iqn.2026-11.io.lunsync:sec-chap"
MUTUAL_IQN = "iqn.2026-11.io.lunsync:sec-mutual"
ACL_IQN = "iqn.2026-11.io.lunsync:sec-acl"
XA_IQN = "iqn.2026-11.io.lunsync:sec-xa"
XB_IQN = "iqn.2026-11.io.lunsync:sec-xb"
USER, SECRET = "carol", "carol-secret-2468"
M_USER, M_SECRET = "dave", "dave-secret-13579"
TARGET_USER, TARGET_SECRET = "lunsync-sec", "target-secret-864"
ALLOWED = "iqn.2026-11.io.lunsync:sec-allowed"
INTRUDER = "iqn.2026-11.io.lunsync:sec-intruder"
HOST_A = "iqn.2026-11.io.lunsync:sec-host-a"
HOST_B = "iqn.2026-11.io.lunsync:sec-host-b"
NAA_A = "6" + "0a5c51bd1b44b91a412d638c08ea6a1"
NAA_B = "6" + "0a5c51bd1b44b91a412d638c08ea6b2"

AUTH = AuthTargets(CHAP_IQN, MUTUAL_IQN, ACL_IQN, USER, SECRET, M_USER, M_SECRET, TARGET_USER, TARGET_SECRET,
                   ALLOWED)

CONFIG = AUTH.toml("4MiB") + f"""
[[lun]]
name = "xa0"
size = "4MiB"
naa = "{NAA_A}"

[[lun]]
name = "xb0"
size = "4MiB"
naa = "{NAA_B}"

[[target]]
iqn = "{XA_IQN}"
luns = [{{lun = 0, name = "xa0"}}]
acl = ["{HOST_A}"]

[[target]]
iqn = "{XB_IQN}"
luns = [{{lun = 0, name = "xb0"}}]
acl = ["{HOST_B}"]
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("lunsync-sec"), config=CONFIG, demo=False, api=True, metrics=True)
    try:
        d.start()
        yield d
    finally:
        d.close()


def metric(d: Daemon, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(d.metrics_url, timeout=10).text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


# --- CHAP by hand -----------------------------------------------------------------------------------------------------

_isid = iter(range(0x400000C00000, 0x400000CFFFFF))


def chap_challenge(ini: RawInitiator, target: str, initiator: str) -> tuple[int, bytes, int]:
    """Security stage up to the target's challenge: returns (CHAP_I, CHAP_C, ExpStatSN)."""
    isid = next(_isid)
    ini.isid = isid
    ini.send(login_request(initiator, target, isid, operational=False, extra={"AuthMethod": "CHAP"},
                           transit=False, nsg=Stage.SECURITY))
    first = ini.recv_pdu()
    assert isinstance(first, LoginResponse) and first.status == 0, first.summary()
    assert first.keys.get("AuthMethod") == "CHAP", first.keys
    ini.send(LoginRequest(transit=0, csg=Stage.SECURITY, nsg=Stage.SECURITY, isid=isid, itt=0, cmd_sn=1,
                          exp_stat_sn=first.stat_sn + 1, data=text_kv({"CHAP_A": "5"})))
    second = ini.recv_pdu()
    assert isinstance(second, LoginResponse) and second.status == 0, second.summary()
    keys = second.keys
    assert keys["CHAP_A"] == "5", keys
    return int(keys["CHAP_I"]), bytes.fromhex(keys["CHAP_C"][2:]), second.stat_sn + 1


def chap_answer(ini: RawInitiator, exp_stat_sn: int, keys: dict[str, str]) -> LoginResponse:
    ini.send(LoginRequest(transit=1, csg=Stage.SECURITY, nsg=Stage.OPERATIONAL, isid=ini.isid, itt=0, cmd_sn=1,
                          exp_stat_sn=exp_stat_sn, data=text_kv(keys)))
    rsp = ini.recv_pdu()
    assert isinstance(rsp, LoginResponse), rsp.summary()
    return rsp


def md5_response(ident: int, secret: str, challenge: bytes) -> str:
    return "0x" + hashlib.md5(bytes([ident]) + secret.encode() + challenge).hexdigest()


def test_wrong_chap_secret_refused_and_counted(daemon: Daemon) -> None:
    before_auth = metric(daemon, "lunsync_login_failures_total", reason="authentication_failure")
    before_kind = metric(daemon, "lunsync_chap_failures_by_reason_total", reason="wrong_response")
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ident, challenge, esn = chap_challenge(ini, CHAP_IQN, ALLOWED)
        rsp = chap_answer(ini, esn, {"CHAP_N": USER, "CHAP_R": md5_response(ident, "not-the-secret-1", challenge)})
        assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE, f"status 0x{rsp.status:04x}"
        assert ini.is_closed(timeout=5), "RFC 7143 §6.3: a failed login closes the connection"
    assert metric(daemon, "lunsync_login_failures_total", reason="authentication_failure") == before_auth + 1
    assert metric(daemon, "lunsync_chap_failures_by_reason_total", reason="wrong_response") == before_kind + 1
    assert metric(daemon, "lunsync_chap_failures_total") >= 1


def test_right_chap_secret_logs_in(daemon: Daemon) -> None:
    """The control for the test above: the same exchange with the right secret passes the security stage."""
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ident, challenge, esn = chap_challenge(ini, CHAP_IQN, ALLOWED)
        rsp = chap_answer(ini, esn, {"CHAP_N": USER, "CHAP_R": md5_response(ident, SECRET, challenge)})
        assert rsp.status == 0 and rsp.transit, f"status 0x{rsp.status:04x}"


def test_chap_reflection_refused_and_counted(daemon: Daemon) -> None:
    """Mutual CHAP where the initiator's challenge is the target's own: the target must not answer it (RFC 7143
    §12.1.3), even though the initiator's own response is right; it is logged in under no circumstances."""
    before = metric(daemon, "lunsync_chap_failures_by_reason_total", reason="reflection")
    mark = daemon.log_mark()
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ident, challenge, esn = chap_challenge(ini, MUTUAL_IQN, ALLOWED)
        rsp = chap_answer(ini, esn, {"CHAP_N": M_USER, "CHAP_R": md5_response(ident, M_SECRET, challenge),
                                     "CHAP_I": str(ident), "CHAP_C": "0x" + challenge.hex()})
        assert rsp.status == LoginStatus.AUTHENTICATION_FAILURE, f"status 0x{rsp.status:04x}"
        assert "CHAP_R" not in rsp.keys, "the target answered its own challenge"
        assert ini.is_closed(timeout=5)
    assert metric(daemon, "lunsync_chap_failures_by_reason_total", reason="reflection") == before + 1
    daemon.wait_for_log(r"(?i)login failed.*reflect", since=mark)


def test_mutual_chap_with_a_fresh_challenge_is_answered(daemon: Daemon) -> None:
    """The control: a different challenge gets the target's proof, computed with the mutual secret."""
    mine = os.urandom(16)
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ident, challenge, esn = chap_challenge(ini, MUTUAL_IQN, ALLOWED)
        rsp = chap_answer(ini, esn, {"CHAP_N": M_USER, "CHAP_R": md5_response(ident, M_SECRET, challenge),
                                     "CHAP_I": "7", "CHAP_C": "0x" + mine.hex()})
        assert rsp.status == 0, f"status 0x{rsp.status:04x}"
        assert rsp.keys.get("CHAP_N") == TARGET_USER
        assert rsp.keys.get("CHAP_R") == md5_response(7, TARGET_SECRET, mine)


def test_unlisted_iqn_refused_and_counted(daemon: Daemon) -> None:
    before = metric(daemon, "lunsync_login_failures_total", reason="authorization_failure")
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ini.send(login_request(INTRUDER, ACL_IQN, next(_isid)))
        rsp = ini.recv_pdu()
        assert isinstance(rsp, LoginResponse) and rsp.status == LoginStatus.AUTHORIZATION_FAILURE, rsp.summary()
        assert ini.is_closed(timeout=5)
    assert metric(daemon, "lunsync_login_failures_total", reason="authorization_failure") == before + 1
    with RawInitiator("127.0.0.1", daemon.port) as ini:  # the listed initiator still gets in
        ini.login(ACL_IQN, initiator=ALLOWED, isid=next(_isid))


# --- EXTENDED COPY across ACLs ----------------------------------------------------------------------------------------


def _cscd(naa_hex: str) -> bytes:
    """An identification CSCD descriptor (0xE4, SPC-4 §6.3.6.2) naming a LU by its NAA designator, 512-byte blocks."""
    d = bytearray(32)
    d[0] = 0xE4
    d[4], d[5], d[7] = 0x01, 0x03, 16  # binary code set, NAA designator, 16 bytes
    d[8:24] = bytes.fromhex(naa_hex)
    d[29:32] = (512).to_bytes(3, "big")
    return bytes(d)


def xcopy_list(list_id: int, src_naa: str, dst_naa: str, blocks: int, src_lba: int, dst_lba: int) -> bytes:
    cscds = _cscd(src_naa) + _cscd(dst_naa)
    seg = struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, 0, 1, blocks, src_lba, dst_lba)  # block to block, §6.3.7.5
    return struct.pack(">BBH4xII", list_id, 0, len(cscds), len(seg), 0) + cscds + seg


def xcopy(ini: RawInitiator, params: bytes):  # type: ignore[no-untyped-def]
    cdb = bytes([0x83, 0x00]) + bytes(8) + len(params).to_bytes(4, "big") + bytes(2)
    return ini.scsi(cdb, write_data=params)


def ready(ini: RawInitiator) -> None:
    for _ in range(3):
        if ini.test_unit_ready().status == 0:
            return
    raise AssertionError("TEST UNIT READY never GOOD")


def test_cross_acl_xcopy_refused_copies_nothing_and_counted(daemon: Daemon) -> None:
    """Host A may see only target A. An EXTENDED COPY that names target B's LUN by its NAA, as source or as
    destination, must end in CHECK CONDITION (COPY ABORTED or ILLEGAL REQUEST) and move no byte either way."""
    a_data, b_data = os.urandom(8 * 512), os.urandom(8 * 512)
    with RawInitiator("127.0.0.1", daemon.port) as b:
        b.login(XB_IQN, initiator=HOST_B, isid=next(_isid))
        ready(b)
        assert b.write10(0, b_data).status == 0
        with RawInitiator("127.0.0.1", daemon.port) as a:
            a.login(XA_IQN, initiator=HOST_A, isid=next(_isid))
            ready(a)
            assert a.write10(0, a_data).status == 0
            # The control: a copy inside A's own LUN works, so a refusal below is the ACL and not a broken XCOPY.
            ok = xcopy(a, xcopy_list(1, NAA_A, NAA_A, 8, 0, 64))
            assert ok.status == 0, f"own-LUN XCOPY: status 0x{ok.status:02x} sense {ok.sense.hex()}"
            assert a.read10(64, 8).data == a_data
            before = metric(daemon, "lunsync_xcopy_refusals_total")
            for list_id, src, dst in ((2, NAA_B, NAA_A), (3, NAA_A, NAA_B), (4, NAA_B, NAA_B)):
                r = xcopy(a, xcopy_list(list_id, src, dst, 8, 0, 128))
                assert r.status == 0x02, f"XCOPY {src[-2:]}->{dst[-2:]} got status 0x{r.status:02x}"
                assert r.sense_key in (0x0A, 0x05), f"sense {r.sense.hex()}: not COPY ABORTED / ILLEGAL REQUEST"
            assert metric(daemon, "lunsync_xcopy_refusals_total") >= before + 3
            assert a.read10(128, 8).data == bytes(8 * 512), "B's data reached A"
        assert b.read10(128, 8).data == bytes(8 * 512), "A's data reached B"
        assert b.read10(0, 8).data == b_data


# --- API --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic eDp5"}],
                         ids=["no-token", "wrong-token", "wrong-scheme"])
def test_api_without_token_refused_and_counted(daemon: Daemon, headers: dict[str, str]) -> None:
    before = metric(daemon, "lunsync_api_unauthorized_total")
    for path in ("/v1/status", "/v1/targets"):
        r = httpx.get(daemon.api_url + path, headers=headers, timeout=10)
        assert r.status_code == 401, f"{path}: {r.status_code} {r.text[:200]}"
    r = httpx.post(daemon.api_url + "/v1/targets", json={"iqn": "iqn.2026-11.io.lunsync:sneaky"}, headers=headers,
                   timeout=10)
    assert r.status_code == 401
    assert metric(daemon, "lunsync_api_unauthorized_total") == before + 3
    good = httpx.get(daemon.api_url + "/v1/targets", headers={"Authorization": f"Bearer {daemon.api_token}"},
                     timeout=10)
    assert good.status_code == 200 and "sneaky" not in good.text
    assert httpx.get(daemon.metrics_url, timeout=10).status_code == 200  # /metrics needs no token


# --- secrets ----------------------------------------------------------------------------------------------------------


def test_secrets_never_logged_and_secret_files_are_0600(daemon: Daemon) -> None:
    log = daemon.log_text()
    token = daemon.api_token
    for secret in (SECRET, M_SECRET, TARGET_SECRET, token, "not-the-secret-1"):
        assert secret not in log, "a secret is in the daemon log"
    holders = []
    for root, _dirs, files in os.walk(daemon.data_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                blob = f.read()
            if any(s.encode() in blob for s in (SECRET, M_SECRET, TARGET_SECRET, token)):
                holders.append(path)
    assert any(p.endswith("api-token") for p in holders), holders
    for path in holders:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} holds a secret with mode {mode:o}"
    daemon.assert_healthy()


def test_tarpit_holds_and_counts(daemon_factory: Callable[..., Daemon]) -> None:
    """More failed logins from one address than the tarpit forgives (10 in a minute): the next connection is held
    before its login is read, is still served, and lunsync_throttled_connections counts it. Its own daemon, so the
    tarpit does not slow the tests above."""
    d = daemon_factory(config=CONFIG, demo=False, metrics=True)
    assert metric(d, "lunsync_throttled_connections_total") == 0
    for _ in range(12):
        with RawInitiator("127.0.0.1", d.port, timeout=15) as ini:
            ini.send(login_request(INTRUDER, ACL_IQN, next(_isid)))
            rsp = ini.recv_pdu()
            assert isinstance(rsp, LoginResponse) and rsp.status == LoginStatus.AUTHORIZATION_FAILURE
    assert metric(d, "lunsync_throttled_connections_total") >= 1
    with RawInitiator("127.0.0.1", d.port, timeout=15) as ini:
        ini.login(ACL_IQN, initiator=ALLOWED, isid=next(_isid))
    assert metric(d, "lunsync_login_failures_total", reason="authorization_failure") == 12

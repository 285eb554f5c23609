"""CHAP, mutual CHAP and initiator ACLs, with libiscsi's iscsi-inq as the initiator and the raw client for statuses.

One daemon serves three targets from a TOML config: one with one-way CHAP, one with mutual CHAP, one with an
initiator ACL. The right credentials log in; wrong ones are refused (iscsi-inq exits non-zero), the refusal carries the
RFC 7143 §11.13.5 status on the wire, and the daemon logs a line for every refused login.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest
from e2e.auth_targets import AuthTargets
from e2e.harness import Daemon, describe, require_tools
from iscsi_scapy import LoginRequest, LoginResponse, LoginStatus, RawInitiator, Stage, login_request, parse_kv, text_kv

pytestmark = pytest.mark.e2e

CHAP_IQN = "iqn.2026-11.io.lunsync:chap"
MUTUAL_IQN = "iqn.2026-11.io.lunsync:mutual"
ACL_IQN = "iqn.2026-11.io.lunsync:acl"
USER, SECRET = "alice", "alice-secret-012"  # RFC 7143 §12.1.3: at least 12 bytes
M_USER, M_SECRET = "bob", "bob-secret-45678"
TARGET_USER, TARGET_SECRET = "lunsync-array", "array-secret-987"
ALLOWED = "iqn.2026-11.io.lunsync:allowed-host"
INTRUDER = "iqn.2026-11.io.lunsync:intruder"
INQ_DEFAULT_INITIATOR = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq"

AUTH = AuthTargets(CHAP_IQN, MUTUAL_IQN, ACL_IQN, USER, SECRET, M_USER, M_SECRET, TARGET_USER, TARGET_SECRET,
                   ALLOWED)

CONFIG = AUTH.toml("16MiB")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    require_tools("iscsi-inq")
    d = Daemon(tmp_path_factory.mktemp("lunsync-auth"), config=CONFIG, demo=False)
    try:
        d.start()
        yield d
    finally:
        d.close()


def inq(url: str, *, initiator: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """iscsi-inq with exactly the CHAP variables given (any inherited LIBISCSI_CHAP_* would change the login)."""
    args = ["iscsi-inq"] + (["-i", initiator] if initiator else []) + [url]
    base = {k: v for k, v in os.environ.items() if not k.startswith("LIBISCSI_CHAP_")}
    return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=30,
                          env={**base, **(env or {})}, check=False)


def assert_login_logged(daemon: Daemon, mark: int, *, failed: bool, who: str) -> str:
    """The daemon logs one line per login and per refused login; find it after ``mark``."""
    word = r"(fail|refus|denied|reject)"
    pattern = rf"(?im)^.*login.*{word}.*{re.escape(who)}.*$|^.*{word}.*login.*{re.escape(who)}.*$" if failed else \
        rf"(?im)^(?!.*{word}).*\blogin\b.*{re.escape(who)}.*$"
    return daemon.wait_for_log(pattern, since=mark).group(0)


def raw_login_status(daemon: Daemon, target: str, initiator: str, keys: dict[str, str] | None = None) -> int:
    """Status of a one-PDU AuthMethod=None login (RFC 7143 §11.13.5)."""
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ini.send(login_request(initiator, target, 0x400000D00001, extra=keys))
        rsp = ini.recv_pdu()
        assert isinstance(rsp, LoginResponse), rsp.summary()
        if rsp.status_class != 0:
            assert ini.is_closed(timeout=5), "RFC 7143 §6.3: a failed login closes the connection"
        return rsp.status


# --- one-way CHAP -----------------------------------------------------------------------------------------------------


def test_chap_right_secret_logs_in(daemon: Daemon) -> None:
    mark = daemon.log_mark()
    p = inq(daemon.url(0, iqn=CHAP_IQN, user=USER, secret=SECRET))
    assert p.returncode == 0, describe(p)
    assert "Vendor:" in p.stdout
    assert_login_logged(daemon, mark, failed=False, who=INQ_DEFAULT_INITIATOR)


def test_chap_credentials_from_environment(daemon: Daemon) -> None:
    p = inq(daemon.url(0, iqn=CHAP_IQN), env={"LIBISCSI_CHAP_USERNAME": USER, "LIBISCSI_CHAP_PASSWORD": SECRET})
    assert p.returncode == 0, describe(p)


@pytest.mark.parametrize(("user", "secret"), [(USER, "not-the-secret-1"), ("mallory", SECRET), (USER, SECRET[:-1])],
                         ids=["wrong-secret", "wrong-user", "truncated-secret"])
def test_chap_wrong_credentials_refused_and_logged(daemon: Daemon, user: str, secret: str) -> None:
    mark = daemon.log_mark()
    p = inq(daemon.url(0, iqn=CHAP_IQN, user=user, secret=secret))
    assert p.returncode != 0, f"logged in with wrong CHAP credentials\n{describe(p)}"
    assert_login_logged(daemon, mark, failed=True, who=CHAP_IQN)


def test_chap_target_refuses_no_authentication(daemon: Daemon) -> None:
    """A CHAP target offered only AuthMethod=None answers "Authentication failure" (0x0201)."""
    mark = daemon.log_mark()
    p = inq(daemon.url(0, iqn=CHAP_IQN))
    assert p.returncode != 0, f"logged in without CHAP\n{describe(p)}"
    assert raw_login_status(daemon, CHAP_IQN, "iqn.2026-11.io.lunsync:no-auth") == LoginStatus.AUTHENTICATION_FAILURE
    assert_login_logged(daemon, mark, failed=True, who=CHAP_IQN)


def test_chap_challenge_offered_with_md5(daemon: Daemon) -> None:
    """RFC 7143 §12.1.3: asked for CHAP with CHAP_A=5, the target answers with CHAP_A=5, CHAP_I and a CHAP_C of at
    least 16 bytes, and stays in the security stage."""
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ini.send(login_request("iqn.2026-11.io.lunsync:probe", CHAP_IQN, 0x400000D00002, operational=False,
                               extra={"AuthMethod": "CHAP,None"}, transit=False, nsg=Stage.SECURITY))
        first = ini.recv_pdu()
        assert isinstance(first, LoginResponse) and first.status == 0, first.summary()
        assert first.keys.get("AuthMethod") == "CHAP", first.keys
        # Only the new key: redeclaring the others would be a renegotiation, which RFC 7143 §6.2 forbids.
        ini.send(LoginRequest(transit=0, csg=Stage.SECURITY, nsg=Stage.SECURITY, isid=0x400000D00002, itt=0, cmd_sn=1,
                              exp_stat_sn=first.stat_sn + 1, data=text_kv({"CHAP_A": "5"})))
        second = ini.recv_pdu()
        assert isinstance(second, LoginResponse) and second.status == 0, second.summary()
        keys = parse_kv(second.data)
        assert keys.get("CHAP_A") == "5", keys
        assert keys.get("CHAP_I", "").isdigit() and 0 <= int(keys["CHAP_I"]) <= 255, keys
        challenge = keys.get("CHAP_C", "")
        assert challenge.lower().startswith("0x") and len(challenge) - 2 >= 32, f"weak challenge {challenge!r}"
        assert second.csg == Stage.SECURITY and not second.transit


# --- mutual CHAP ------------------------------------------------------------------------------------------------------


def test_mutual_chap_right_secrets_log_in(daemon: Daemon) -> None:
    mark = daemon.log_mark()
    p = inq(daemon.url(0, iqn=MUTUAL_IQN, user=M_USER, secret=M_SECRET),
            env={"LIBISCSI_CHAP_TARGET_USERNAME": TARGET_USER, "LIBISCSI_CHAP_TARGET_PASSWORD": TARGET_SECRET})
    assert p.returncode == 0, f"mutual CHAP login failed\n{describe(p)}\n{daemon.log_tail()}"
    assert_login_logged(daemon, mark, failed=False, who=INQ_DEFAULT_INITIATOR)


def test_mutual_chap_target_proves_the_wrong_secret(daemon: Daemon) -> None:
    """The initiator expects the target to know a different secret: the target's CHAP_R cannot match, and the
    initiator (libiscsi) refuses the target."""
    p = inq(daemon.url(0, iqn=MUTUAL_IQN, user=M_USER, secret=M_SECRET),
            env={"LIBISCSI_CHAP_TARGET_USERNAME": TARGET_USER, "LIBISCSI_CHAP_TARGET_PASSWORD": "other-secret-000"})
    assert p.returncode != 0, f"libiscsi accepted a target that proved the wrong secret\n{describe(p)}"


def test_mutual_chap_target_name_checked(daemon: Daemon) -> None:
    """libiscsi checks that the CHAP_N the target sends is the target user it expects."""
    p = inq(daemon.url(0, iqn=MUTUAL_IQN, user=M_USER, secret=M_SECRET),
            env={"LIBISCSI_CHAP_TARGET_USERNAME": "someone-else", "LIBISCSI_CHAP_TARGET_PASSWORD": TARGET_SECRET})
    assert p.returncode != 0, describe(p)


def test_mutual_chap_wrong_initiator_secret_refused_and_logged(daemon: Daemon) -> None:
    mark = daemon.log_mark()
    p = inq(daemon.url(0, iqn=MUTUAL_IQN, user=M_USER, secret="wrong-secret-0000"),
            env={"LIBISCSI_CHAP_TARGET_USERNAME": TARGET_USER, "LIBISCSI_CHAP_TARGET_PASSWORD": TARGET_SECRET})
    assert p.returncode != 0, describe(p)
    assert_login_logged(daemon, mark, failed=True, who=MUTUAL_IQN)


# --- ACL --------------------------------------------------------------------------------------------------------------


def test_acl_allows_the_listed_initiator(daemon: Daemon) -> None:
    mark = daemon.log_mark()
    p = inq(daemon.url(0, iqn=ACL_IQN), initiator=ALLOWED)
    assert p.returncode == 0, describe(p)
    assert_login_logged(daemon, mark, failed=False, who=ALLOWED)


def test_acl_refuses_other_initiators_and_logs_it(daemon: Daemon) -> None:
    mark = daemon.log_mark()
    p = inq(daemon.url(0, iqn=ACL_IQN), initiator=INTRUDER)
    assert p.returncode != 0, f"an initiator outside the ACL logged in\n{describe(p)}"
    assert_login_logged(daemon, mark, failed=True, who=INTRUDER)


def test_acl_refusal_is_authorization_failure(daemon: Daemon) -> None:
    """RFC 7143 §11.13.5: "The initiator is not allowed access to the given target" is 0x0202."""
    assert raw_login_status(daemon, ACL_IQN, INTRUDER) == LoginStatus.AUTHORIZATION_FAILURE
    assert raw_login_status(daemon, ACL_IQN, ALLOWED) == LoginStatus.SUCCESS


def test_unauthenticated_target_does_not_leak_into_protected_ones(daemon: Daemon) -> None:
    """A session on the ACL target cannot reach the CHAP target's LUN by naming it in a later login."""
    assert raw_login_status(daemon, CHAP_IQN, ALLOWED) == LoginStatus.AUTHENTICATION_FAILURE


def test_login_and_logout_each_logged_once(daemon: Daemon) -> None:
    mark = daemon.log_mark()
    with RawInitiator("127.0.0.1", daemon.port) as ini:
        ini.login(ACL_IQN, initiator=ALLOWED, isid=0x400000D00077)
        assert ini.logout().response == 0
    daemon.wait_for_log(rf"(?im)^.*logout.*{re.escape(ALLOWED)}.*$", since=mark)
    logged = [line for line in daemon.log_since(mark).splitlines() if ALLOWED in line]
    assert len([line for line in logged if re.search(r"(?i)\blogin\b", line)]) == 1, logged
    assert len([line for line in logged if re.search(r"(?i)\blogout\b", line)]) == 1, logged


def test_daemon_healthy_after_auth_tests(daemon: Daemon) -> None:
    daemon.assert_healthy()
    assert SECRET not in daemon.log_text() and M_SECRET not in daemon.log_text(), "secrets in the log"

"""Prometheus metrics of the real daemon: per-LUN counters and latency rise with qemu-io I/O, and every failure family
(login refused, CHAP, bad PDU, API without token) is counted.

Values come from scraping ``/metrics`` on the metrics port and parsing it with prometheus-client's own parser, so a
malformed exposition fails here too.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from api_harness import ApiDaemon, sample
from e2e.harness import describe, require_tools, run
from iscsi_scapy import BHS, RawInitiator

pytestmark = pytest.mark.e2e

DEMO = "iqn.2026-11.io.lunsync:demo"
MIB = 1 << 20


def qemu_io(d: ApiDaemon, *commands: str) -> None:
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    p = run([*cmd, d.url(0)], timeout=60)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout + p.stderr, describe(p)


def test_per_lun_counters_and_latency_rise_with_io(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    require_tools("qemu-io")
    d = api_daemon_factory()
    before = d.scrape()
    assert sample(before, "lunsync_write_commands_total", lun="demo0") == 0
    assert sample(before, "lunsync_lun_capacity_bytes", lun="demo0") == 256 * MIB

    qemu_io(d, "write -P 0x5a 0 1M", "write -P 0x5b 4M 512k")
    mid = d.scrape()
    writes = sample(mid, "lunsync_write_commands_total", lun="demo0")
    assert writes >= 2
    assert sample(mid, "lunsync_write_bytes_total", lun="demo0") == MIB + 512 * 1024

    qemu_io(d, "read -P 0x5a 0 1M", "read -P 0x5b 4M 512k")
    after = d.scrape()
    assert sample(after, "lunsync_read_commands_total", lun="demo0") >= 2
    assert sample(after, "lunsync_read_bytes_total", lun="demo0") >= MIB + 512 * 1024
    assert sample(after, "lunsync_write_commands_total", lun="demo0") == writes, "reads are not writes"

    for op in ("read", "write"):
        count = sample(after, "lunsync_command_latency_seconds_count", lun="demo0", op=op)
        assert count >= 2
        assert sample(after, "lunsync_command_latency_seconds_bucket", lun="demo0", op=op, le="+Inf") == count
        assert 0 < sample(after, "lunsync_command_latency_seconds_sum", lun="demo0", op=op) < 60
        # Buckets are cumulative: the 2.5 s bucket holds at least as much as the 1 ms one.
        assert sample(after, "lunsync_command_latency_seconds_bucket", lun="demo0", op=op, le="2.5") >= \
            sample(after, "lunsync_command_latency_seconds_bucket", lun="demo0", op=op, le="0.001")
    assert sample(after, "lunsync_logins_total") >= 2


def test_sessions_gauge_and_login_failure_reasons(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    d = api_daemon_factory()
    t = "iqn.2026-11.io.lunsync:metrics-acl"
    with d.http() as c:
        assert c.post("/v1/targets", json={"iqn": t}).status_code == 201
        assert c.post(f"/v1/targets/{t}/acls", json={"initiator": "iqn.2026-11.test:allowed"}).status_code == 201
    with RawInitiator("127.0.0.1", d.port) as ri:
        ri.login(DEMO)
        assert sample(d.scrape(), "lunsync_sessions") == 1
    with RawInitiator("127.0.0.1", d.port) as ri:
        assert ri.login(t, "iqn.2026-11.test:stranger", check=False).status == 0x0202
    with RawInitiator("127.0.0.1", d.port) as ri:
        assert ri.login("iqn.2026-11.io.lunsync:nosuch", check=False).status == 0x0203
    m = d.scrape()
    assert sample(m, "lunsync_login_failures_total", reason="authorization_failure") == 1
    assert sample(m, "lunsync_login_failures_total", reason="not_found") == 1
    assert sample(m, "lunsync_logins_total") == 1


def test_chap_failures_are_counted(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    d = api_daemon_factory()
    with d.http() as c:
        r = c.put(f"/v1/targets/{DEMO}/chap", json={"user": "u", "secret": "metrics-secret-1"})
        assert r.status_code == 200
    assert sample(d.scrape(), "lunsync_chap_failures_total") == 0
    with RawInitiator("127.0.0.1", d.port) as ri:
        assert ri.login(DEMO, check=False).status == 0x0201
    assert sample(d.scrape(), "lunsync_chap_failures_total") == 1


def test_rejected_pdus_are_counted(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    d = api_daemon_factory()
    with RawInitiator("127.0.0.1", d.port) as ri:
        ri.login(DEMO)
        # Opcode 0x1f is not an initiator opcode (RFC 7143 §11.2.1.2): the target answers with a Reject.
        bogus = bytearray(48)
        bogus[0] = 0x1F
        bogus[1] = 0x80
        bogus[16:20] = (0x1234).to_bytes(4, "big")
        bogus[24:28] = ri.cmd_sn.to_bytes(4, "big")
        ri.send(bytes(bogus))
        got: list[BHS] = ri.drain(timeout=1.0)
        assert got, "the target neither answered nor closed"
    m = d.scrape()
    rejected = sum(s.value for fam in _families(m) if fam.name == "lunsync_rejected_pdus" for s in fam.samples)
    assert rejected >= 1, m


def test_api_refusals_are_counted(api_daemon_factory: Callable[..., ApiDaemon]) -> None:
    d = api_daemon_factory()
    before = sample(d.scrape(), "lunsync_api_unauthorized_total")
    with d.http(token="") as anon:
        for _ in range(3):
            assert anon.get("/v1/luns").status_code == 401
    assert sample(d.scrape(), "lunsync_api_unauthorized_total") == before + 3


def test_exposition_shape(api_daemon: ApiDaemon) -> None:
    r = httpx.get(api_daemon.metrics_url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in _families(r.text)}
    for name, kind in (("lunsync_read_commands", "counter"), ("lunsync_write_commands", "counter"),
                       ("lunsync_read_bytes", "counter"), ("lunsync_write_bytes", "counter"),
                       ("lunsync_command_latency_seconds", "histogram"), ("lunsync_sessions", "gauge"),
                       ("lunsync_logins", "counter"), ("lunsync_login_failures", "counter"),
                       ("lunsync_rejected_pdus", "counter"), ("lunsync_chap_failures", "counter"),
                       ("lunsync_api_unauthorized", "counter")):
        assert families[name].type == kind, name
    labels = {k for f in families.values() if f.name.startswith("lunsync_") for s in f.samples for k in s.labels}
    assert {"lun", "op", "reason", "le"} <= labels
    unbounded = {"lba", "itt", "tag", "initiator", "initiator_port", "isid", "tsih", "address", "peer", "cmd_sn"}
    assert not labels & unbounded, f"unbounded label in {labels}"
    # Rejects are labelled by the RFC's reason names, all present from the start.
    reasons = {s.labels["reason"] for s in families["lunsync_rejected_pdus"].samples}
    assert {"protocol_error", "command_not_supported", "invalid_pdu_field"} <= reasons
    assert httpx.get(api_daemon.metrics_url.replace("/metrics", "/other"), timeout=10).status_code == 404
    # The metrics port needs no token; the API port does.
    assert httpx.get(f"http://127.0.0.1:{api_daemon.api_port}/metrics", timeout=10).status_code == 401


def _families(text: str) -> list:  # type: ignore[type-arg]
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))

"""The API's input bound and its failed-authentication tarpit, against the real daemon over TCP.

A body over the limit gets 413 before it is read: declared with Content-Length (refused without reading a byte of
it), sent chunked (refused once it grows past the limit), and the daemon's RSS does not grow by the body's size.
An address that keeps presenting wrong tokens is held before its next requests are answered, counted in
``lunsync_api_auth_throttled_total``, while the token's holder still gets in.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from api_harness import ApiDaemon, sample

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

MIB = 1 << 20


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raw_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    sock.settimeout(10)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, rest


def test_a_declared_100mb_body_gets_413_unread(api_daemon: ApiDaemon) -> None:
    assert api_daemon.proc is not None
    rss_before = _rss_kib(api_daemon.proc.pid)
    with socket.create_connection(("127.0.0.1", api_daemon.api_port)) as s:
        s.sendall(b"POST /v1/luns HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + api_daemon.token.encode() + b"\r\n"
                  b"Content-Length: 100000000\r\n\r\n" + b'{"name": "' + b"a" * 4096)
        t0 = time.monotonic()
        status, body = _raw_response(s)
        took = time.monotonic() - t0
    assert status == 413, body
    assert "larger than 1048576 bytes" in json.loads(body)["error"]
    assert took < 2.0, f"413 took {took:.2f}s: the body was waited for"
    assert _rss_kib(api_daemon.proc.pid) - rss_before < 20 * 1024


def test_a_chunked_body_is_cut_off_at_the_limit(api_daemon: ApiDaemon) -> None:
    assert api_daemon.proc is not None
    with socket.create_connection(("127.0.0.1", api_daemon.api_port)) as s:
        s.sendall(b"POST /v1/luns HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + api_daemon.token.encode() + b"\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"a" * (256 << 10)
        sent = 0
        try:
            # 8 MiB if the server kept reading; it must answer once 1 MiB has arrived.
            for _ in range(32):
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, body = _raw_response(s)
    assert status == 413, body
    assert api_daemon.proc.poll() is None


def test_a_json_body_over_the_limit_gets_413_and_small_ones_still_work(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        r = c.post("/v1/luns", json={"name": "big", "size": "1MiB", "path": "x" * (MIB + 10)})
        assert r.status_code == 413, r.text
        r = c.post("/v1/luns", json={"name": "guard-small", "size": "1MiB"})
        assert r.status_code == 201, r.text
        # apply carries a whole configuration: up to its own 1 MiB limit it is not cut off by the body limit.
        export = c.get("/v1/export").json()["config"]
        padded = export + "\n" + "#" * (MIB - len(export) - 100) + "\n"
        r = c.post("/v1/apply", json={"config": padded, "dry_run": True})
        assert r.status_code == 200, r.text[:300]


def test_wrong_tokens_are_tarpitted_per_address_and_the_holder_still_gets_in(api_daemon: ApiDaemon) -> None:
    before = sample(api_daemon.scrape(), "lunsync_api_auth_throttled_total")
    with api_daemon.http(token="wrong-token") as wrong, api_daemon.http() as good:
        for _ in range(10):
            assert wrong.get("/v1/status").status_code == 401
        held = []
        for _ in range(3):
            t0 = time.monotonic()
            assert wrong.get("/v1/status").status_code == 401
            held.append(time.monotonic() - t0)
        # ten failures are free; the 12th and 13th requests wait 0.25 and 0.5 s before the token is looked at
        assert held[0] < 0.2 and held[1] >= 0.2 and held[2] >= 0.45, held
        t0 = time.monotonic()
        assert good.get("/v1/status").status_code == 200
        assert time.monotonic() - t0 < 5.5
    assert sample(api_daemon.scrape(), "lunsync_api_auth_throttled_total") >= before + 3

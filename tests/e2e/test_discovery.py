"""SendTargets on wildcard portals, through libiscsi's iscsi-ls: each discovery answers with the address the
initiator reached (IPv4, and IPv6 as ``[addr]:port``), or the configured ``advertise`` addresses, and a login to the
answered address then works (iscsi-inq, iscsi-readcapacity16)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from e2e.harness import DEMO_IQN, Daemon, DaemonFailed, describe, free_port, require_tools, run

pytestmark = pytest.mark.e2e


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def discover(host: str, port: int) -> list[str]:
    """The portals iscsi-ls lists for the demo target, discovering through ``host:port``."""
    where = f"[{host}]" if ":" in host else host
    p = run(["iscsi-ls", "-s", f"iscsi://{where}:{port}"])
    assert p.returncode == 0, describe(p)
    assert f"Target:{DEMO_IQN}" in p.stdout, describe(p)
    return re.findall(r"Portal:(\S+)", p.stdout)


def on_own_ports(daemon_factory: Callable[..., Daemon], count: int,
                 kwargs_for: Callable[[list[int]], Mapping[str, Any]]) -> tuple[Daemon, list[int]]:
    """A daemon listening on ``count`` ports the test picks besides the harness's own. Another process may take one
    between free_port() and the daemon's bind (a split daemon binds seconds later); the harness picks its own ports
    again then, but not the test's, so pick them again here."""
    for attempt in range(3):
        ports = [free_port() for _ in range(count)]
        try:
            return daemon_factory(**kwargs_for(ports)), ports
        except DaemonFailed as e:
            if attempt == 2 or "in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def login_works(portal: str) -> None:
    """A normal session to the answered portal (``HOST:PORT,TPGT``): INQUIRY and READ CAPACITY(16)."""
    address = portal.rsplit(",", 1)[0]
    p = run(["iscsi-inq", f"iscsi://{address}/{DEMO_IQN}/0"])
    assert p.returncode == 0 and "lunsync" in p.stdout.lower(), describe(p)
    p = run(["iscsi-readcapacity16", f"iscsi://{address}/{DEMO_IQN}/0"])
    assert p.returncode == 0 and "Total size" in p.stdout, describe(p)


def test_wildcard_portal_answers_each_discovery_with_the_address_it_was_reached_on(
        daemon_factory: Callable[..., Daemon]) -> None:
    require_tools("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16")
    ipv6 = _has_ipv6_loopback()

    def listen(ports: list[int]) -> dict[str, Any]:
        args = ["--listen", f"0.0.0.0:{ports[0]}"]
        if ipv6:
            args += ["--listen", f"[::]:{ports[1]}"]
        return {"extra_args": args}

    d, ports = on_own_ports(daemon_factory, 2 if ipv6 else 1, listen)
    v4, v6 = ports[0], (ports[1] if ipv6 else None)
    for host in ("127.0.0.1", "127.0.0.2"):
        portals = discover(host, v4)
        # The harness's own 127.0.0.1 portal is listed as it is; the wildcard one as the address reached.
        assert f"{host}:{v4},1" in portals and f"0.0.0.0:{v4},1" not in portals, portals
        assert f"127.0.0.1:{d.port},1" in portals, portals
        login_works(f"{host}:{v4},1")
    if v6 is not None:
        portals = discover("::1", v6)
        assert f"[::1]:{v6},1" in portals and not any(p.startswith("[::]") for p in portals), portals
        login_works(f"[::1]:{v6},1")
    d.assert_healthy()


def test_advertise_replaces_the_listen_addresses_in_discovery(daemon_factory: Callable[..., Daemon]) -> None:
    require_tools("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16")
    # As behind NAT: initiators are told an address that is not one the daemon binds as such (here another
    # loopback address that the wildcard socket also serves).
    d, (wild,) = on_own_ports(daemon_factory, 1, lambda ports: {
        "config": f'[portal]\nlisten = ["0.0.0.0:{ports[0]}"]\nadvertise = ["127.0.0.3:{ports[0]}"]\n',
        "extra_args": ["--listen", f"0.0.0.0:{ports[0]}"]})
    for host in ("127.0.0.1", "127.0.0.2"):
        assert discover(host, wild) == [f"127.0.0.3:{wild},1"]
    login_works(f"127.0.0.3:{wild},1")
    d.assert_healthy()

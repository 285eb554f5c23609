"""Fixtures shared by the whole suite: free ports and the real daemon for the end-to-end tests.

The daemon itself lives in :mod:`tests.e2e.harness`; this file only exposes it as fixtures and makes the test helper
modules (``iscsi_scapy``, ``e2e.harness``) importable however pytest is invoked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from ceph_cluster import CephCluster, start_cluster
from e2e.harness import Daemon
from e2e.harness import free_port as _free_port


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """One single-node Ceph cluster (mon, mgr, memstore OSD on loopback) for the whole session, started on first use
    and torn down at the end. Its start time is printed, to keep an eye on the suite's budget."""
    cluster = start_cluster()
    print(f"\nceph cluster up in {cluster.start_seconds:.1f} s", file=sys.stderr)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a loopback port nobody listens on."""
    return _free_port


@pytest.fixture
def daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """Start daemons for one test (``daemon_factory(config=..., portals=2)``); all are killed at the end."""
    started: list[Daemon] = []

    def make(**kwargs: object) -> Daemon:
        d = Daemon(tmp_path_factory.mktemp("lunsync"), **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.close()


@pytest.fixture(scope="module")
def demo_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One demo daemon (256 MiB thin LUN 0) shared by the tests of a module that do not interfere."""
    d = Daemon(tmp_path_factory.mktemp("lunsync-demo"))
    try:
        d.start()
        yield d
    finally:
        d.close()

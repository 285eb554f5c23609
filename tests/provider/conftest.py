"""Fixtures for the management-plane tests: API-enabled daemons from :mod:`api_harness`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_harness import ApiDaemon


@pytest.fixture
def api_daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ApiDaemon]]:
    """Start API-enabled daemons for one test; all are killed at the end."""
    started: list[ApiDaemon] = []

    def make(**kwargs: Any) -> ApiDaemon:
        d = ApiDaemon(tmp_path_factory.mktemp("lunsync-api"), **kwargs)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.close()


@pytest.fixture(scope="module")
def api_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiDaemon]:
    """One demo daemon (256 MiB thin LUN 0 on the demo target) with its API, shared by a module's tests."""
    d = ApiDaemon(tmp_path_factory.mktemp("lunsync-api"))
    try:
        d.start()
        yield d
    finally:
        d.close()

"""The management-plane tests' view of the daemon: the shared e2e daemon, plus its API and metrics ports.

:class:`ApiDaemon` extends :class:`e2e.harness.Daemon` with free loopback ports for ``--api`` and ``--metrics`` (kept
across restarts like the iSCSI ports), the token the daemon wrote, an authenticated httpx client, and a runner for
the ``lunsync`` CLI pointed at that daemon. Everything else (start, kill -9, logs) is the shared harness.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from e2e.harness import Daemon, describe, free_port, lunsync_command

API_TIMEOUT_S = 10.0


def _wait_accepts(port: int, timeout: float = API_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing accepts on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.05)


# The shared harness grew its own --api/--metrics ports (api=True, metrics=True); use them when it has them, so both
# harnesses start the daemon the same way, and allocate the ports here when it does not.
_HARNESS_HAS_PORTS = "api" in inspect.signature(Daemon.__init__).parameters


class ApiDaemon(Daemon):
    """A daemon with its management API and metrics endpoint on their own free ports (or the API on ``api``, e.g.
    ``unix:/path``)."""

    def __init__(self, workdir: Path, *, api: str | None = None, **kwargs: Any) -> None:
        if _HARNESS_HAS_PORTS:
            kwargs.update(api=api is None, metrics=True)
        super().__init__(workdir, **kwargs)
        self.api_spec = api
        if not _HARNESS_HAS_PORTS:
            self.api_port: int | None = None
            self.metrics_port: int | None = None

    def command(self) -> list[str]:
        # argparse keeps the last of a repeated option, so these override whatever the shared harness put first.
        cmd = super().command()
        if not _HARNESS_HAS_PORTS:
            cmd += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
            if self.api_spec is None:
                cmd += ["--api", f"127.0.0.1:{self.api_port}"]
        if self.api_spec is not None:
            cmd += ["--api", self.api_spec]
        return cmd

    def start(self) -> ApiDaemon:
        if not _HARNESS_HAS_PORTS and not self.metrics_port:
            self.api_port, self.metrics_port = free_port(), free_port()
        super().start()
        # The daemon binds the API before the iSCSI portals, so these normally return at once.
        if self.api_spec is None:
            assert self.api_port
            _wait_accepts(self.api_port)
        assert self.metrics_port
        _wait_accepts(self.metrics_port)
        return self

    @property
    def api_url(self) -> str:
        return self.api_spec or f"http://127.0.0.1:{self.api_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    def http(self, *, token: str | None = None) -> httpx.Client:
        """An httpx client on ``/`` of the API, authenticated unless ``token=""``."""
        tok = self.token if token is None else token
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", headers=headers, timeout=30)

    def cli(self, *args: str, check: bool = False, env: dict[str, str] | None = None,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``lunsync ARGS`` against this daemon: API from LUNSYNC_API, token found through LUNSYNC_DATA_DIR,
        unless ``env`` says otherwise. Any LUNSYNC_* the developer exported is left out."""
        full_env = {**_clean_env(), "LUNSYNC_API": self.api_url, "LUNSYNC_DATA_DIR": str(self.data_dir),
                    **(env or {})}
        p = subprocess.run([*lunsync_command(), *args], check=False, capture_output=True, text=True, errors="replace",
                           input=input_text, env=full_env, timeout=120, cwd=self.workdir)
        if check:
            assert p.returncode == 0, describe(p)
        return p

    def cli_json(self, *args: str) -> Any:
        p = self.cli(*args, "--json", check=True)
        return json.loads(p.stdout)

    def scrape(self) -> str:
        """The metrics exposition, as Prometheus would fetch it."""
        r = httpx.get(self.metrics_url, timeout=10)
        assert r.status_code == 200, r.text
        return r.text


def _clean_env() -> dict[str, str]:
    """The test's environment without any lunsync settings a developer may have exported."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LUNSYNC_")}


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format; 0.0 when the series is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def names(items: Sequence[dict[str, Any]], key: str = "name") -> list[Any]:
    return [x[key] for x in items]


def qemu_io(url: str, *commands: str, timeout: float = 120) -> str:
    """Run qemu-io's ``commands`` against ``url`` and return what it printed; any failure (a refused command, a
    pattern that did not verify) fails the test."""
    from e2e.harness import describe, run

    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    p = run([*args, url], timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "failed" not in out.lower(), describe(p)
    return out


def raw_session(d: Daemon, isid: int, luns: Sequence[int] = (0,),
                target: str = "iqn.2026-11.io.lunsync:demo") -> Any:
    """A logged-in :class:`iscsi_scapy.RawInitiator` on ``target`` with its own ISID (the same ISID would reinstate,
    that is close, another session of the test), past the unit attentions of ``luns``."""
    from iscsi_scapy import RawInitiator

    ri = RawInitiator("127.0.0.1", d.port, timeout=10)
    ri.login(target=target, isid=isid)
    for lun in luns:
        for _ in range(8):  # POWER ON, REPORTED LUNS DATA HAS CHANGED...
            if ri.test_unit_ready(lun).status == 0:
                break
    return ri

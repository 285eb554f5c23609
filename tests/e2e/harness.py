"""Start and stop the real ``lunsync serve`` daemon for end-to-end tests, and run the real clients against it.

This module owns the daemon's lifecycle in tests: a :class:`Daemon` runs ``lunsync serve`` as a subprocess on free
loopback ports with its own data directory, waits until every portal accepts, and is always torn down, dumping its log
when it fails to start. It also owns the small helpers every e2e test needs: finding the shared tools directory,
skipping cleanly when a Debian tool is missing, and running a client with its output kept for assertion messages.
Nothing here knows iSCSI beyond the URL format.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, Self

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_IQN = "iqn.2026-11.io.lunsync:demo"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (there is a small race, which :meth:`Daemon.start` retries)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_dir() -> Path:
    """The shared tools checkout: ``$LUNSYNC_SHARED``, else ``../shared`` next to the repository."""
    env = os.environ.get("LUNSYNC_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def require_tools(*names: str) -> None:
    """Skip the calling test when a client it drives is not installed."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian: libiscsi-bin, qemu-utils, qemu-block-extra)")


def lunsync_command() -> list[str]:
    """How to run the ``lunsync`` CLI: the venv's console script when present, else the module."""
    for candidate in (Path(sys.executable).parent / "lunsync", REPO_ROOT / ".venv" / "bin" / "lunsync"):
        if candidate.exists():
            return [str(candidate)]
    if importlib.util.find_spec("lunsync.provider.cli") is not None:
        return [sys.executable, "-c", "import sys; from lunsync.provider.cli import main; sys.exit(main())"]
    found = shutil.which("lunsync")
    if found:
        return [found]
    pytest.skip("the lunsync CLI is not installed (pip install -e .)")
    raise AssertionError("unreachable")


def run(
    cmd: Sequence[str], *, timeout: float = 120, env: Mapping[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a client; output is text with stderr kept apart. ``check`` asserts exit 0 and shows the output if not."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace", timeout=timeout, env=full_env,
                       check=False)
    if check:
        assert p.returncode == 0, describe(p)
    return p


def describe(p: subprocess.CompletedProcess[str]) -> str:
    args = p.args if isinstance(p.args, str) else " ".join(map(str, p.args))
    return f"`{args}` exited {p.returncode}\n--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-4000:]}"


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class DaemonFailed(AssertionError):
    pass


class _NotifySocket:
    """A NOTIFY_SOCKET for one start of the daemon (an abstract unix datagram socket: no path to clean up or to
    outgrow sun_path), and whether READY=1 has arrived on it."""

    def __init__(self) -> None:
        name = f"lunsync-e2e-{os.getpid()}-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)
        self.sock.setblocking(False)
        self.address = "@" + name
        self._ready = False

    def ready(self) -> bool:
        while not self._ready:
            try:
                datagram = self.sock.recv(4096)
            except BlockingIOError:
                break
            self._ready = b"READY=1" in datagram.split(b"\n")
        return self._ready

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """One ``lunsync serve`` process with its data directory, ports and log.

    The ports and the data directory survive :meth:`restart`, so a restarted daemon serves the same LUNs at the same
    URLs. Use it as a context manager (or call :meth:`close`): it is killed if a test leaves it running.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        portals: int = 1,
        config: str | None = None,
        demo: bool = True,
        demo_size: str | None = "256MiB",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        api: bool = False,
        metrics: bool = False,
        host: str = "127.0.0.1",
        workers: int | Literal["default"] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host  # where the iSCSI portals listen (any 127.0.0.0/8 address: a second gateway "host")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "daemon.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.workdir / "lunsync.toml"
            self.config_path.write_text(config)
        self.portals = portals
        # serve --workers N (a control process and N workers; 1 is one process). A daemon a test starts without
        # saying is one process: the suite starts hundreds, and split one starts about a second slower (the
        # daemon's own default is a worker per core). LUNSYNC_E2E_WORKERS sets it for every such daemon, which is
        # how `make test` runs the conformance and e2e tests split into workers; "default" passes no --workers.
        env_workers = os.environ.get("LUNSYNC_E2E_WORKERS")
        self.workers = workers if workers is not None else (int(env_workers) if env_workers else 1)
        self.demo, self.demo_size = demo, demo_size
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.ports: list[int] = []
        # The API and metrics listen on fixed default ports unless told otherwise; parallel daemons would collide.
        self.api, self.metrics = api, metrics
        self.api_port: int | None = None
        self.metrics_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._notify: _NotifySocket | None = None
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [*lunsync_command(), "serve", "--data-dir", str(self.data_dir)]
        for p in self.ports:
            cmd += ["--listen", f"{self.host}:{p}"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        cmd += ["--api", f"127.0.0.1:{self.api_port}" if self.api_port else "off"]
        cmd += ["--metrics", f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "off"]
        if self.demo:
            cmd.append("--demo")
            if self.demo_size:
                cmd += ["--demo-size", self.demo_size]
        if self.workers != "default":
            cmd += ["--workers", str(self.workers)]
        return cmd + self.extra_args

    def start(self) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        fresh_ports = not self.ports
        for attempt in range(3):
            if fresh_ports:
                self.ports = [free_port() for _ in range(self.portals)]
                self.api_port = free_port() if self.api else None
                self.metrics_port = free_port() if self.metrics else None
            try:
                self._spawn_and_wait()
                return self
            except DaemonFailed:
                # Another process may have taken a port between free_port() and bind(); only then try again.
                if not fresh_ports or attempt == 2 or "in use" not in self.log_text().lower():
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        self.starts += 1
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        # The daemon says READY=1 (sd_notify) once every portal, the API and metrics listen, which is more than the
        # harness can see by connecting: a test may add listeners of its own (--listen, a config's portals), and
        # the last of them binds after the first already accepts. A test that watches NOTIFY_SOCKET itself keeps it.
        # Kept open while the daemon runs, so that its STOPPING=1 at shutdown finds it (else it logs a warning).
        self._close_notify()
        notify = self._notify = None if "NOTIFY_SOCKET" in self.env else _NotifySocket()
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.address
        try:
            with open(self.log_path, "ab") as log:
                log.write(f"\n===== start #{self.starts}: {' '.join(self.command())}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=self.workdir, env=env, start_new_session=True,
                )
            deadline = time.monotonic() + START_TIMEOUT_S
            pending = [(self.host, p) for p in self.ports]
            pending += [("127.0.0.1", p) for p in (self.api_port, self.metrics_port) if p]
            while pending or (notify is not None and not notify.ready()):
                if self.proc.poll() is not None:
                    raise DaemonFailed(f"lunsync serve exited {self.proc.returncode} during start-up\n"
                                       f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    self._kill()
                    waiting = f"accept on {pending}" if pending else "say READY=1"
                    raise DaemonFailed(f"lunsync serve did not {waiting} within {START_TIMEOUT_S}s\n"
                                       f"{self.log_tail()}")
                pending = [(h, p) for h, p in pending if not _accepts(p, h)]
                if pending or (notify is not None and not notify.ready()):
                    time.sleep(0.05)
        except BaseException:
            self._close_notify()
            raise

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, and assert the clean exit status 0 the daemon promises."""
        assert self.proc is not None and self.running, "not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise AssertionError(f"lunsync serve ignored SIGTERM for {timeout}s\n{self.log_tail()}") from None
        self._close_notify()
        assert rc == 0, f"lunsync serve exited {rc} on SIGTERM\n{self.log_tail()}"
        return rc

    def kill9(self) -> None:
        """SIGKILL: a crash, with no chance to flush or close anything."""
        assert self.proc is not None and self.running, "not running"
        self._kill()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # The whole process group: with --workers the workers go down with the control, as in a crash.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._close_notify()

    def restart(self, *, clean: bool = True) -> Daemon:
        """Stop (SIGTERM, or SIGKILL with ``clean=False``) and start again on the same ports and data dir."""
        if self.running:
            if clean:
                self.terminate()
            else:
                self.kill9()
        return self.start()

    def close(self) -> None:
        self._kill()

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what tests look at ------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def api_url(self) -> str:
        assert self.api_port, "started without api=True"
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port, "started without metrics=True"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def api_token(self) -> str:
        """The API bearer token the daemon generated in its data directory."""
        return (self.data_dir / "api-token").read_text().strip()

    def url(
        self,
        lun: int = 0,
        *,
        iqn: str = DEMO_IQN,
        portal: int = 0,
        user: str | None = None,
        secret: str | None = None,
    ) -> str:
        cred = ""
        if user is not None:
            cred = user + (f"%{secret}" if secret is not None else "") + "@"
        return f"iscsi://{cred}{self.host}:{self.ports[portal]}/{iqn}/{lun}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_text().splitlines()[-n:]
        return "--- lunsync serve log (tail) ---\n" + "\n".join(lines)

    def log_mark(self) -> int:
        """A position in the log; :meth:`log_since` returns what was logged after it."""
        return len(self.log_text())

    def log_since(self, mark: int) -> str:
        return self.log_text()[mark:]

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 5.0) -> re.Match[str]:
        """The first match of ``pattern`` logged after ``since``; fails with the log tail after ``timeout``."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_since(since))
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r} within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def assert_healthy(self) -> None:
        """Still running, and nothing in the log that says an exception escaped (h11's fuzz invariant: any input
        either parses or is a protocol error, never anything else)."""
        assert self.running, f"lunsync serve died (exit {self.proc and self.proc.returncode})\n{self.log_tail()}"
        assert "Traceback (most recent call last)" not in self.log_text(), f"exception in the daemon\n{self.log_tail(120)}"


def daemon_fixture(workdir: Path, **kwargs: object) -> Iterator[Daemon]:
    """Body of a ``yield`` fixture: start, hand over, always kill."""
    d = Daemon(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        d.start()
        yield d
    finally:
        d.close()


class PatternReader:
    """qemu-io verifying one pattern over one range of an ``iscsi://`` URL, again and again on a thread, until the
    ``with`` block ends: a reader that runs throughout a restore. ``runs`` counts the reads, ``failures`` keeps what
    each failed one printed."""

    def __init__(self, url: str, byte: int, offset: int, length: int) -> None:
        self.argv = ["qemu-io", "-f", "raw", "-r", "-c", f"read -P {byte:#x} {offset} {length}", url]
        self.runs = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            p = run(self.argv, timeout=120)
            self.runs += 1
            if p.returncode != 0 or "verification failed" in p.stdout + p.stderr or "read " not in p.stdout:
                self.failures.append(describe(p))

    def __enter__(self) -> Self:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(60)

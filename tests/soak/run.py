"""Soak the live daemon: ``python tests/soak/run.py --duration 300`` runs many sessions of verified I/O for a while.

This module owns the soak run. It starts ``lunsync serve`` with several LUNs in one target and runs one long-lived
qemu-io (libiscsi) process per session, fed commands on stdin: each round issues ``--qd`` asynchronous requests at once
(``aio_write -P`` of a fresh pattern to half the session's slots, ``aio_read -P`` of the last pattern written to the
other half, alternating), then ``aio_flush``. Each session owns its own range of one LUN, so every read has a known
expected pattern and qemu-io verifies it; qemu's retries of a command the target refused (BUSY, TASK SET FULL) are
counted too. Half-way through, a snapshot of the first LUN is taken and resynced to a new LUN with ``lunsync resync
--wait --verify`` while the load continues. At the end it checks: 0 I/O errors, 0 retries and 0 verification failures,
the daemon never died and logged no traceback, VmRSS stayed under the bound, and the daemon's open descriptors came back
(no socket left open; new files only those of the snapshot and the new LUN).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from e2e.harness import Daemon, lunsync_command

IQN = "iqn.2026-11.io.lunsync:soak"
LUN_MIB = 64
SLOT = 64 << 10  # bytes per request


def config(luns: int) -> str:
    out = []
    for i in range(luns):
        out.append(f'[[lun]]\nname = "soak{i}"\nsize = "{LUN_MIB}MiB"\nthin = true\n')
    mapping = ", ".join(f'{{lun = {i}, name = "soak{i}"}}' for i in range(luns))
    out.append(f'[[target]]\niqn = "{IQN}"\nluns = [{mapping}]\n')
    return "\n".join(out)


@dataclass
class Session:
    """One qemu-io process on one LUN, owning ``qd`` slots of :data:`SLOT` bytes from ``base``."""

    index: int
    url: str
    base: int
    qd: int
    deadline: float
    proc: subprocess.Popen[str] | None = None
    rounds: int = 0
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    error_lines: int = 0  # every error line, though only the first 20 are kept
    # qemu's retries of a command answered BUSY or TASK SET FULL (or a retryable CHECK CONDITION): it gives up after a
    # few, so a write the target keeps refusing is lost. A healthy store must not be refused at all.
    retries: int = 0
    retry_samples: list[str] = field(default_factory=list)
    last: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(["qemu-io", "-f", "raw", self.url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.last = [0] * self.qd
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _pattern(self) -> int:
        return 1 + (self.index * 7 + self.rounds) % 254

    def _write(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            # Round 0 writes every slot, so each later read has a known pattern.
            p = self._pattern()
            lines = [f"aio_write -P {p:#x} {self.base + i * SLOT} {SLOT}" for i in range(self.qd)]
            self.last = [p] * self.qd
            self.proc.stdin.write("\n".join([*lines, "aio_flush", ""]))
            self.rounds = 1
            while time.monotonic() < self.deadline:
                p = self._pattern()
                lines = []
                for i in range(self.qd):
                    off = self.base + i * SLOT
                    if (i + self.rounds) % 2:
                        lines.append(f"aio_write -P {p:#x} {off} {SLOT}")
                        self.last[i] = p
                    else:
                        lines.append(f"aio_read -P {self.last[i]:#x} {off} {SLOT}")
                # qemu-io reads the next line only after aio_flush returns: the pipe paces the rounds.
                self.proc.stdin.write("\n".join([*lines, "aio_flush", ""]))
                self.rounds += 1
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError) as e:
            self.errors.append(f"session {self.index}: qemu-io went away: {e!r}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(("qemu-io> wrote", "qemu-io> read", "wrote ", "read ")) and " bytes at offset " in line:
                self.ops += 1
            elif "iSCSI Busy/TaskSetFull/TimeOut" in line or "iSCSI CheckCondition" in line:
                self.retries += 1
                if len(self.retry_samples) < 3:
                    self.retry_samples.append(f"session {self.index}: {line.strip()}")
            elif re.search(r"(?i)fail|error|verification|cannot|could not", line):
                self.error_lines += 1
                if len(self.errors) < 20:
                    self.errors.append(f"session {self.index}: {line.strip()}")

    def wait(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.errors.append(f"session {self.index}: qemu-io did not finish within {timeout}s")
            return
        if rc != 0:
            self.errors.append(f"session {self.index}: qemu-io exited {rc}")


def fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return sorted(out)


def rss_kib(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def cli(d: Daemon, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LUNSYNC_API": d.api_url, "LUNSYNC_DATA_DIR": str(d.data_dir)}
    return subprocess.run([*lunsync_command(), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def soak(duration_s: float, *, workdir: Path, sessions: int = 64, qd: int = 32, luns: int = 4,
         rss_growth_mib: int = 512, progress: bool = False) -> dict[str, Any]:
    per_lun = -(-sessions // luns)
    assert per_lun * qd * SLOT <= LUN_MIB << 20, "sessions' ranges do not fit in the LUNs"
    d = Daemon(workdir, config=config(luns), demo=False, api=True, metrics=True)
    d.start()
    try:
        assert d.proc is not None
        pid = d.proc.pid
        fds_before = fds(pid)
        rss_start = rss_kib(pid)
        rss_max = rss_start
        deadline = time.monotonic() + duration_s
        pool = [Session(i, d.url(i % luns, iqn=IQN), (i // luns) * qd * SLOT, qd, deadline) for i in range(sessions)]
        for s in pool:
            s.start()
        events: dict[str, Any] = {}

        def middle() -> None:
            time.sleep(duration_s / 2)
            t = time.monotonic()
            p = cli(d, "snapshot", "create", "soak0@mid")
            events["snapshot"] = {"rc": p.returncode, "s": round(time.monotonic() - t, 2), "out": p.stdout[-300:],
                                "err": p.stderr[-300:]}
            t = time.monotonic()
            p = cli(d, "resync", "soak0@mid", "--to", "soakcopy", "--wait", "--verify")
            events["resync"] = {"rc": p.returncode, "s": round(time.monotonic() - t, 2), "out": p.stdout[-300:],
                                "err": p.stderr[-300:]}

        mid = threading.Thread(target=middle, daemon=True)
        mid.start()
        last_print = time.monotonic()
        while time.monotonic() < deadline + 5 and any(s.proc and s.proc.poll() is None for s in pool):
            time.sleep(0.5)
            if not d.running:
                break
            rss_max = max(rss_max, rss_kib(pid))
            if progress and time.monotonic() - last_print > 15:
                last_print = time.monotonic()
                print(f"[soak] {sum(s.ops for s in pool)} ops, {sum(len(s.errors) for s in pool)} errors, "
                      f"rss {rss_max // 1024} MiB", flush=True)
        for s in pool:
            s.wait(120)
        mid.join(900)
        died = not d.running
        fds_after: list[str] = []
        if not died:
            for _ in range(40):  # sessions end asynchronously; give the daemon a moment to close them
                fds_after = fds(pid)
                if sum(f.startswith("socket:") for f in fds_after) <= sum(f.startswith("socket:") for f in fds_before):
                    break
                time.sleep(0.25)
        new = sorted(set(fds_after) - set(fds_before)) if not died else []
        extra_sockets = sum(f.startswith("socket:") for f in fds_after) - sum(f.startswith("socket:")
                                                                              for f in fds_before)
        foreign = [f for f in new if not f.startswith("socket:") and not f.startswith(str(d.data_dir))]
        errors = [e for s in pool for e in s.errors]
        log = d.log_text()
        tracebacks = log.count("Traceback (most recent call last)")
        rss_bound = rss_start + rss_growth_mib * 1024
        result = {
            "duration_s": duration_s, "sessions": sessions, "qd": qd, "luns": luns,
            "ops": sum(s.ops for s in pool), "rounds": sum(s.rounds for s in pool),
            "retries": sum(s.retries for s in pool), "retry_samples": [r for s in pool for r in s.retry_samples][:5],
            "mib_moved": round(sum(s.ops for s in pool) * SLOT / (1 << 20)),
            "io_errors": sum(s.error_lines for s in pool) + len([e for e in errors if "qemu-io" in e]), "daemon_died": died, "tracebacks": tracebacks,
            "rss_start_mib": round(rss_start / 1024, 1), "rss_max_mib": round(rss_max / 1024, 1),
            "rss_bound_mib": round(rss_bound / 1024, 1), "fds_before": len(fds_before), "fds_after": len(fds_after),
            "extra_sockets": extra_sockets, "new_fds": new, "foreign_new_fds": foreign,
            "snapshot": events.get("snapshot"), "resync": events.get("resync"), "error_samples": errors[:10],
        }
        result["ok"] = (not errors and result["retries"] == 0 and not died and tracebacks == 0
                        and rss_max <= rss_bound and extra_sockets <= 0 and not foreign and len(new) <= 8 and result["ops"] > 0
                        and (events.get("snapshot") or {}).get("rc") == 0
                        and (events.get("resync") or {}).get("rc") == 0)
        return result
    finally:
        if d.running:
            d.terminate()
        d.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--luns", type=int, default=4)
    ap.add_argument("--rss-growth-mib", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lunsync-soak-"))
    r = soak(args.duration, workdir=workdir, sessions=args.sessions, qd=args.qd, luns=args.luns,
             rss_growth_mib=args.rss_growth_mib, progress=True)
    print(json.dumps(r, indent=2))
    print(f"daemon log: {workdir / 'daemon.log'}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

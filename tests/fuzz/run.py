"""Fuzz the live daemon: ``python tests/fuzz/run.py N`` sends N inputs from :mod:`fuzz.cases` and checks invariants.

This module owns the fuzz run: it starts ``lunsync serve`` with two targets (``fuzz``, abused, and ``verify``, used
only by a qemu-io loop that writes and reads back a pattern), feeds hypothesis-drawn inputs to worker threads that
each hold their own sessions, and classifies what comes back. The invariants, checked all along:

* every input gets an answer (any target PDU: Reject, Login Response, SCSI Response, the probe's NOP-In) or the
  target closes the connection, within a bound; anything else is a *hang*;
* a target never sends an initiator opcode, a bad digest, or a PDU we cannot frame (*violation*);
* a split valid login logs in;
* no ``Traceback`` and no ``internal error`` in the daemon log, and the daemon stays up;
* the verified qemu-io session sees no error;
* the daemon's VmRSS stays below its post-warm-up level plus ``--rss-growth-mib``.

Exit status 0 only when all hold. Timers are short on purpose (NOP-In every 1 s, 2 s to answer, 2 s to log in) so an
input that leaves the target waiting for bytes costs seconds, not minutes; the failed-login tarpit still applies,
which is why new connections get a generous deadline.
"""

from __future__ import annotations

import argparse
import collections
import json
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from e2e.harness import Daemon
from fuzz.cases import (
    FUZZ_INITIATOR,
    Case,
    OpInfo,
    Phase,
    all_cases,
    digest_probe,
    nop_probe,
    parse_rsoc,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import Phase as HPhase
from iscsi_scapy import (
    BHS,
    R2T,
    RESERVED_TAG,
    ConnectionClosed,
    DataIn,
    DataOut,
    LoginResponse,
    NopIn,
    ProtocolViolation,
    RawInitiator,
    Reject,
    ScsiCommand,
    ScsiResponse,
    encode_lun,
)

FUZZ_IQN = "iqn.2026-11.io.lunsync:fuzz"
VERIFY_IQN = "iqn.2026-11.io.lunsync:verify"
CONFIG = f"""
[portal]
nop_interval_s = 1
nop_timeout_s = 2
login_timeout_s = 2

[[lun]]
name = "fuzz0"
size = "16MiB"
thin = true

[[lun]]
name = "verify0"
size = "64MiB"
thin = true

[[target]]
iqn = "{FUZZ_IQN}"
luns = [{{lun = 0, name = "fuzz0"}}]

[[target]]
iqn = "{VERIFY_IQN}"
luns = [{{lun = 0, name = "verify0"}}]
"""
# A new connection may sit in the failed-login tarpit (up to 5 s, lunsync.target.throttle) before it is read.
NEW_CONNECTION_S = 14.0
# A stalled session is pinged after 1 s of silence and dropped 2 s later; anything slower than this is a hang.
STALL_S = 15.0
CDB_S = 30.0
VERIFY_MIB = 1


@dataclass
class Tally:
    """Outcome counts and failure samples, shared by the threads (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    families: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    samples: list[str] = field(default_factory=list)
    done: int = 0

    def record(self, case: Case, outcome: str, failure: str | None = None, detail: str = "") -> None:
        with self.lock:
            self.done += 1
            self.outcomes[outcome] += 1
            self.families[case.family.split("-0x")[0]] += 1
            if failure:
                self.failures[failure] += 1
                if len(self.samples) < 40:
                    blob = b"".join(case.chunks)[:256].hex() if case.chunks else case.cdb.hex()
                    self.samples.append(f"{failure} {case.family} {detail} input={blob}")


def _answer_kind(pdu: BHS) -> str:
    if isinstance(pdu, Reject):
        return f"reject-{int(pdu.reason):#04x}"
    if isinstance(pdu, LoginResponse):
        return f"login-status-{pdu.status:#06x}"
    if isinstance(pdu, ScsiResponse):
        return f"scsi-status-{int(pdu.status):#04x}"
    return type(pdu).__name__.lower()


class Worker(threading.Thread):
    """Runs cases from the queue; holds one plain, one digest and one CDB session, re-made when the target drops
    them. ``k`` makes its ISIDs unique so sessions never reinstate each other."""

    def __init__(self, k: int, port: int, q: queue.Queue[Case | None], tally: Tally, ops: dict[tuple[int, int | None],
                 OpInfo]) -> None:
        super().__init__(daemon=True, name=f"fuzz-{k}")
        self.k, self.port, self.q, self.tally, self.ops = k, port, q, tally, ops
        # Each worker is its own "host" on loopback: the daemon's per-address tarpit for failed logins (which the
        # fuzzer provokes all the time) then slows only that worker, as it would one misbehaving initiator.
        self.source = f"127.0.{1 + k // 250}.{1 + k % 250}"
        self.sessions: dict[Phase, RawInitiator] = {}
        self.itt = 0x10000

    def run(self) -> None:
        while True:
            case = self.q.get()
            if case is None:
                break
            try:
                self.one(case)
            except Exception as e:  # noqa: BLE001  (a bug in the fuzzer itself: counted, never silent)
                self.tally.record(case, "fuzzer-error", "fuzzer-error", repr(e))
        for s in self.sessions.values():
            s.close()

    def _next_itt(self) -> int:
        self.itt = self.itt % 0xFFFFFF00 + 1
        return self.itt

    def _session(self, phase: Phase) -> RawInitiator:
        ini = self.sessions.get(phase)
        if ini is not None:
            return ini
        ini = RawInitiator("127.0.0.1", self.port, timeout=NEW_CONNECTION_S, source=self.source).connect()
        extra = {"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"} if phase is Phase.DIGEST else None
        isid = 0x400000F00000 + self.k * 4 + {Phase.FFP: 0, Phase.DIGEST: 1, Phase.CDB: 2}[phase]
        ini.login(FUZZ_IQN, initiator=FUZZ_INITIATOR, isid=isid, extra=extra)
        if phase is Phase.DIGEST:
            assert ini.header_digest_on and ini.data_digest_on, f"digests not negotiated: {ini.target_keys}"
        ini.timeout = STALL_S
        self.sessions[phase] = ini
        return ini

    def _drop(self, phase: Phase) -> None:
        ini = self.sessions.pop(phase, None)
        if ini is not None:
            ini.close()

    def one(self, case: Case) -> None:
        if case.phase in (Phase.LOGIN, Phase.SPLIT_LOGIN):
            self.fresh_connection(case)
        elif case.phase is Phase.CDB:
            self.cdb(case)
        else:
            self.in_session(case)

    def fresh_connection(self, case: Case) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=NEW_CONNECTION_S,
                                      source_address=(self.source, 0)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ini = RawInitiator("127.0.0.1", self.port, timeout=NEW_CONNECTION_S)
            ini.sock = sock
            try:
                for chunk in case.chunks:
                    sock.sendall(chunk)
            except OSError:
                self.tally.record(case, "closed")
                return
            deadline = time.monotonic() + NEW_CONNECTION_S
            kinds: list[str] = []
            try:
                while True:
                    pdu = ini.recv_pdu(timeout=max(0.0, deadline - time.monotonic()))
                    kinds.append(_answer_kind(pdu))
                    if case.phase is Phase.SPLIT_LOGIN and isinstance(pdu, LoginResponse):
                        ok = pdu.status == 0 and pdu.transit and pdu.nsg == 3
                        self.tally.record(case, kinds[0], None if ok else "split-login-refused", ",".join(kinds))
                        ini.sock = None
                        return
                    if case.phase is Phase.LOGIN and kinds:
                        # An answer came; a failed login must also close (RFC 7143 §6.3), which is not waited for
                        # here to keep the run fast (tests/e2e/test_malformed.py checks it).
                        self.tally.record(case, kinds[0])
                        ini.sock = None
                        return
            except ConnectionClosed:
                fail = "split-login-closed" if case.phase is Phase.SPLIT_LOGIN else None
                self.tally.record(case, kinds[0] if kinds else "closed", fail)
            except TimeoutError:
                self.tally.record(case, "hang", "hang", f"no answer within {NEW_CONNECTION_S}s")
            except ProtocolViolation as e:
                self.tally.record(case, "violation", "target-violation", str(e)[:200])
            finally:
                ini.sock = None

    def in_session(self, case: Case) -> None:
        phase = case.phase
        ini = self._session(phase)
        itt = self._next_itt()
        probe = digest_probe(itt) if phase is Phase.DIGEST else nop_probe(itt)
        kinds: list[str] = []
        try:
            assert ini.sock is not None
            for chunk in case.chunks:
                ini.sock.sendall(chunk)
            ini.sock.sendall(probe)
            deadline = time.monotonic() + STALL_S
            while True:
                pdu = ini.recv_pdu(timeout=max(0.0, deadline - time.monotonic()))
                if isinstance(pdu, NopIn) and pdu.itt == itt:
                    ini.cmd_sn = pdu.exp_cmd_sn
                    self.tally.record(case, kinds[0] if kinds else "answered-probe")
                    return
                if isinstance(pdu, NopIn) and pdu.itt == RESERVED_TAG:
                    continue  # a keepalive ping; not answering it lets a stalled connection time out
                kinds.append(_answer_kind(pdu))
        except (ConnectionClosed, BrokenPipeError, ConnectionResetError):
            self._drop(phase)
            self.tally.record(case, kinds[0] if kinds else "closed")
        except TimeoutError:
            self._drop(phase)
            self.tally.record(case, "hang", "hang", f"neither answer nor close within {STALL_S}s; saw {kinds}")
        except ProtocolViolation as e:
            self._drop(phase)
            self.tally.record(case, "violation", "target-violation", str(e)[:200])

    def cdb(self, case: Case) -> None:
        ini = self._session(Phase.CDB)
        itt = self._next_itt()
        flags = 0x81
        if case.direction == 1 and case.edtl:
            flags |= 0x40
        if case.direction == 2 and case.edtl:
            flags |= 0x20
        data = case.data_out if flags & 0x20 else b""
        immediate = data[: min(int(ini.param("FirstBurstLength", "65536")), ini.target_mrdsl)]
        cmd = ScsiCommand(flags=flags, lun=encode_lun(0), itt=itt, expected_data_transfer_length=case.edtl,
                          cmd_sn=ini.cmd_sn, exp_stat_sn=ini.exp_stat_sn, cdb=case.cdb, data=immediate)
        ini.cmd_sn = (ini.cmd_sn + 1) & 0xFFFFFFFF
        try:
            ini.send(cmd)
            deadline = time.monotonic() + CDB_S
            while True:
                pdu = ini.recv_pdu(timeout=max(0.0, deadline - time.monotonic()))
                if isinstance(pdu, NopIn) and pdu.itt == RESERVED_TAG:
                    if pdu.ttt != RESERVED_TAG:
                        ini.send(_nop_reply(ini, pdu))
                    continue
                if isinstance(pdu, R2T) and pdu.itt == itt:
                    ini.send(_data_out(ini, pdu, data))
                    continue
                if isinstance(pdu, DataIn) and pdu.itt == itt:
                    ini.cmd_sn = max(ini.cmd_sn, pdu.exp_cmd_sn)
                    if pdu.flags & 0x01:
                        ini.exp_stat_sn = pdu.stat_sn + 1
                        self.tally.record(case, f"scsi-status-{int(pdu.status):#04x}")
                        return
                    continue
                if isinstance(pdu, ScsiResponse) and pdu.itt == itt:
                    ini.exp_stat_sn = pdu.stat_sn + 1
                    ini.cmd_sn = pdu.exp_cmd_sn
                    self.tally.record(case, _answer_kind(pdu))
                    return
                if isinstance(pdu, Reject):
                    self.tally.record(case, _answer_kind(pdu))
                    return
                self._drop(Phase.CDB)
                self.tally.record(case, "violation", "target-violation", f"unexpected {pdu.summary()}")
                return
        except (ConnectionClosed, BrokenPipeError, ConnectionResetError):
            self._drop(Phase.CDB)
            self.tally.record(case, "closed")
        except TimeoutError:
            self._drop(Phase.CDB)
            self.tally.record(case, "hang", "hang", f"no status within {CDB_S}s")
        except ProtocolViolation as e:
            self._drop(Phase.CDB)
            self.tally.record(case, "violation", "target-violation", str(e)[:200])


def _nop_reply(ini: RawInitiator, ping: NopIn) -> BHS:
    from iscsi_scapy import NopOut

    return NopOut(immediate=1, itt=RESERVED_TAG, ttt=ping.ttt, lun=ping.lun, cmd_sn=ini.cmd_sn,
                  exp_stat_sn=ini.exp_stat_sn)


def _data_out(ini: RawInitiator, r2t: R2T, data: bytes) -> list[BHS]:
    """Answer an R2T with what it asks for (zeros past our buffer: a lying EDTL is the CDB's business)."""
    off, want = r2t.buffer_offset, min(r2t.desired_data_transfer_length, 4 << 20)
    step = ini.target_mrdsl
    out: list[BHS] = []
    for i, pos in enumerate(range(off, off + want, step)):
        n = min(step, off + want - pos)
        chunk = data[pos : pos + n].ljust(n, b"\0")
        out.append(DataOut(flags=0x80 if pos + n >= off + want else 0, lun=r2t.lun, itt=r2t.itt, ttt=r2t.ttt,
                           exp_stat_sn=ini.exp_stat_sn, data_sn=i, buffer_offset=pos, data=chunk))
    return out


class Verifier(threading.Thread):
    """qemu-io on the verify target, write then read back a pattern, one MiB range after another, until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="verify")
        self.url = url
        self.stop = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            pattern = 0x11 + self.rounds % 0xEE
            off = (self.rounds % 64) * VERIFY_MIB << 20
            n = VERIFY_MIB << 20
            cmd = ["qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {off} {n}",
                   "-c", f"read -P {pattern:#x} {off} {n}", self.url]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120, check=False)
                out = p.stdout + p.stderr
                if p.returncode != 0 or "verification failed" in out or "wrote" not in out or "read " not in out:
                    self.errors.append(f"round {self.rounds}: exit {p.returncode}: {out[-500:]}")
            except subprocess.TimeoutExpired:
                self.errors.append(f"round {self.rounds}: qemu-io timed out")
            self.rounds += 1


class Watch(threading.Thread):
    """The daemon's pulse: up, VmRSS, and the log free of tracebacks; sampled every ``period_s``."""

    def __init__(self, daemon: Daemon, period_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="watch")
        self.d, self.period_s = daemon, period_s
        self.stop = threading.Event()
        self.rss_kib: list[int] = []
        self.died = False
        self.tracebacks = 0

    def rss(self) -> int:
        assert self.d.proc is not None
        try:
            text = Path(f"/proc/{self.d.proc.pid}/status").read_text()
        except FileNotFoundError:
            return 0
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        return int(m.group(1)) if m else 0

    def run(self) -> None:
        while not self.stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        if not self.d.running:
            self.died = True
            return
        self.rss_kib.append(self.rss())
        log = self.d.log_text()
        self.tracebacks = log.count("Traceback (most recent call last)") + log.count("internal error")


def supported_ops(port: int) -> dict[tuple[int, int | None], OpInfo]:
    """The opcode list from the daemon itself (REPORT SUPPORTED OPERATION CODES), with each command's data direction
    from the registry the daemon answers from."""
    import lunsync.target.scsi.target  # noqa: F401  (registers the handlers)
    from lunsync.target.scsi.registry import Dir, find

    with RawInitiator("127.0.0.1", port, timeout=NEW_CONNECTION_S) as ini:
        ini.login(FUZZ_IQN, initiator=FUZZ_INITIATOR, isid=0x400000FFFFF0)
        r = None
        for _ in range(3):  # the first command of a nexus may see a UNIT ATTENTION
            r = ini.scsi(bytes([0xA3, 0x0C, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), read_length=65536)
            if r.status == 0:
                break
        assert r is not None and r.status == 0, f"REPORT SUPPORTED OPERATION CODES failed: {r and r.sense.hex()}"
        ini.logout()
    out: dict[tuple[int, int | None], OpInfo] = {}
    for op in parse_rsoc(r.data):
        spec = find(op.opcode, op.service_action)
        direction = {Dir.NONE: 0, Dir.IN: 1, Dir.OUT: 2}[spec.data] if spec is not None and not isinstance(
            spec, dict) else 1
        out[(op.opcode, op.service_action)] = OpInfo(op.opcode, op.service_action, op.cdb_len, direction)
    return out


@dataclass
class Report:
    n: int
    seconds: float
    tally: Tally
    verify_rounds: int
    verify_errors: list[str]
    daemon_died: bool
    tracebacks: int
    rss_start_kib: int
    rss_max_kib: int
    rss_bound_kib: int
    opcodes: int

    @property
    def ok(self) -> bool:
        return (not self.daemon_died and self.tracebacks == 0 and not self.verify_errors and not self.tally.failures
                and self.rss_max_kib <= self.rss_bound_kib and self.verify_rounds > 0)

    def summary(self) -> dict[str, Any]:
        return {
            "inputs": self.tally.done, "requested": self.n, "seconds": round(self.seconds, 1),
            "inputs_per_s": round(self.tally.done / max(self.seconds, 1e-9), 1),
            "daemon_crashes": int(self.daemon_died), "tracebacks_in_log": self.tracebacks,
            "failures": dict(self.tally.failures), "verify_rounds": self.verify_rounds,
            "verify_errors": len(self.verify_errors), "rss_start_mib": round(self.rss_start_kib / 1024, 1),
            "rss_max_mib": round(self.rss_max_kib / 1024, 1), "rss_bound_mib": round(self.rss_bound_kib / 1024, 1),
            "opcodes_fuzzed": self.opcodes, "families": dict(sorted(self.tally.families.items())),
            "outcomes": dict(self.tally.outcomes.most_common()), "ok": self.ok,
        }


def fuzz(n: int, *, workdir: Path, workers: int = 32, seed_value: int = 0, rss_growth_mib: int = 256,
         max_seconds: float | None = None, progress: bool = False) -> Report:
    """Start a daemon in ``workdir``, run ``n`` inputs (or until ``max_seconds``), stop it, and report."""
    d = Daemon(workdir, config=CONFIG, demo=False)
    d.start()
    try:
        ops = supported_ops(d.port)
        watch = Watch(d)
        verifier = Verifier(d.url(0, iqn=VERIFY_IQN))
        verifier.start()
        q: queue.Queue[Case | None] = queue.Queue(maxsize=workers * 4)
        tally = Tally()
        pool = [Worker(k, d.port, q, tally, ops) for k in range(workers)]
        for w in pool:
            w.start()
        watch.start()
        start = time.monotonic()
        rss_start = 0
        last_print = start

        @settings(max_examples=n, phases=[HPhase.generate], database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @seed(seed_value)
        @given(all_cases(sorted(ops.values(), key=lambda o: (o.opcode, o.service_action or -1))))
        def produce(case: Case) -> None:
            nonlocal rss_start, last_print
            if watch.died:
                raise _Stop
            if max_seconds is not None and time.monotonic() - start > max_seconds:
                raise _Stop
            q.put(case)
            if not rss_start and tally.done >= min(200, n // 10 + 1):
                rss_start = watch.rss()  # after warm-up: every session open, caches filled
            if progress and time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"[fuzz] {tally.done}/{n} inputs, {dict(tally.failures) or 'no failures'}, "
                      f"verify rounds {verifier.rounds} errors {len(verifier.errors)}, "
                      f"rss {watch.rss() // 1024} MiB", flush=True)

        try:
            with warnings.catch_warnings():
                # scapy's fuzz() draws from the global random module, which hypothesis warns about; that is the point.
                warnings.simplefilter("ignore")
                produce()
        except _Stop:
            pass
        for _ in pool:
            q.put(None)
        for w in pool:
            w.join(CDB_S + NEW_CONNECTION_S)
        seconds = time.monotonic() - start
        verifier.stop.set()
        verifier.join(150)
        watch.stop.set()
        watch.join(5)
        watch.sample()
        rss_start = rss_start or (watch.rss_kib[0] if watch.rss_kib else 0)
        return Report(n, seconds, tally, verifier.rounds, verifier.errors, watch.died or not d.running,
                      watch.tracebacks, rss_start, max(watch.rss_kib or [0]), rss_start + rss_growth_mib * 1024,
                      len(ops))
    finally:
        if d.running:
            d.terminate()
        d.close()


class _Stop(Exception):
    """Ends hypothesis generation early (time budget or a dead daemon)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, help="number of inputs")
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-growth-mib", type=int, default=256,
                    help="fail if VmRSS grows more than this above its level after warm-up")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop generating after this long")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the daemon's data and log here")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lunsync-fuzz-"))
    report = fuzz(args.n, workdir=workdir, workers=args.workers, seed_value=args.seed,
                  rss_growth_mib=args.rss_growth_mib, max_seconds=args.max_seconds, progress=True)
    print(json.dumps(report.summary(), indent=2))
    for s in report.tally.samples[:20]:
        print("sample:", s)
    for e in report.verify_errors[:5]:
        print("verify error:", e)
    print(f"daemon log: {workdir / 'daemon.log'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

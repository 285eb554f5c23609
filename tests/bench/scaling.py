"""Scaling with worker processes: N targets on N workers, each target driven by its own initiator pinned to a core.

For ``--workers 1`` and ``--workers 2`` this starts ``lunsync serve`` with N = workers targets (one thin LUN each,
512-byte blocks) and drives every target at once with its own client, pinned with ``taskset`` to core ``i % cores``:
4 KiB random reads at QD32 with libiscsi's ``iscsi-perf -r -m 32 -b 8``, then 4 KiB writes at QD32 with
``qemu-img bench -w -d 32 -s 4096`` (iscsi-perf only reads; qemu-img's writes are sequential). It prints the aggregate
IOPS, and the CPU time per command of each worker (utime + stime from /proc/PID/stat over the phase, divided by the
commands of the targets it serves, which ``lunsync status`` names), of the control process (which only logs in and
hands sessions off; over all the phase's commands) and of the initiators (from their rusage). ``--workers 1`` is one
process, with no control, so the 1-worker row is the daemon alone. A daemon without ``--workers`` is measured as one
process for the 1-worker row and the 2-worker row is skipped, saying so.

The modelled figure for 16 cores is computed from this run's measurements, and its method printed beside it: the
workers' CPU per command ``w`` (of the run with the most workers) and the control's ``c``; with initiators on other
machines and a device that is not the limit, 16 cores complete ``16e6 / (w + c)`` commands per second. The same model
with the initiators' own CPU per command ``i`` added predicts this machine's ceiling ``cores * 1e6 / (w + c + i)``,
printed beside the measured aggregate with how busy each worker was, as a check of the model. On a 2-core machine the initiators and the workers
share the cores, so 2 workers cannot double 1 worker's rate here: the output says so.

Usage: python tests/bench/scaling.py [--seconds S] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
IQN = "iqn.2026-11.io.lunsync:scale{}"
LUN_BYTES = 256 << 20
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_workers_option() -> bool:
    p = subprocess.run([PY, "-m", "lunsync.provider.cli", "serve", "--help"], capture_output=True, text=True,
                       cwd=REPO, check=False)
    return "--workers" in p.stdout


def config(n: int) -> str:
    out = []
    for i in range(n):
        out += [f'[[lun]]\nname = "scale{i}"\nsize = "{LUN_BYTES}"\nblock_size = 512\nthin = true\n']
    for i in range(n):
        out += [f'[[target]]\niqn = "{IQN.format(i)}"\nluns = [{{ lun = 0, name = "scale{i}" }}]\n']
    return "\n".join(out)


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Phase:
    name: str
    iops: float
    commands: int
    seconds: float
    control_cpu_s: float | None  # None: one process serves everything
    worker_cpu_s: list[float]
    worker_commands: list[int]  # the commands of the targets each worker serves
    initiator_cpu_s: float

    def per_cmd_us(self, cpu: float) -> float:
        return cpu / max(1, self.commands) * 1e6

    @property
    def worker_us(self) -> float:
        return self.per_cmd_us(sum(self.worker_cpu_s))

    @property
    def each_worker_us(self) -> list[float]:
        return [cpu / max(1, n) * 1e6 for cpu, n in zip(self.worker_cpu_s, self.worker_commands, strict=True)]

    @property
    def control_us(self) -> float:
        return self.per_cmd_us(self.control_cpu_s or 0.0)

    @property
    def initiator_us(self) -> float:
        return self.per_cmd_us(self.initiator_cpu_s)


@dataclass
class Row:
    workers: int
    processes: str
    phases: list[Phase] = field(default_factory=list)


class Daemon:
    def __init__(self, tmp: Path, n: int, workers: int | None) -> None:
        self.port = free_port()
        cfg = tmp / "scale.toml"
        cfg.write_text(config(n))
        self.log_path = tmp / "daemon.log"
        self.api_port = free_port()
        self.data_dir = tmp / "data"
        cmd = [PY, "-m", "lunsync.provider.cli", "serve", "--config", str(cfg), "--data-dir", str(self.data_dir),
               "--listen", f"127.0.0.1:{self.port}", "--api", f"127.0.0.1:{self.api_port}", "--metrics", "off"]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.urls = [f"iscsi://127.0.0.1:{self.port}/{IQN.format(i)}/0" for i in range(n)]
        deadline = time.monotonic() + 60
        for url in self.urls:  # every target answers (its worker is up), not just the portal
            while subprocess.run(["iscsi-inq", "-i", "iqn.2026-11.io.lunsync:scale-probe", url],
                                 capture_output=True, check=False).returncode != 0:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"lunsync serve did not serve {url}; see {self.log_path}:\n"
                                     f"{self.log_path.read_text()[-2000:]}")
                time.sleep(0.2)

    def processes(self) -> tuple[int, list[int], dict[int, list[int]]]:
        """The daemon's pid, its worker processes' (none when it serves alone), and which targets (by index) each
        worker serves, as ``lunsync status`` says."""
        token = (self.data_dir / "api-token").read_text().strip()
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/v1/status",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            status = json.loads(r.read())
        index = {IQN.format(i).lower(): i for i in range(len(self.urls))}
        owns = {int(w["pid"]): [index[t.lower()] for t in w["targets"] if t.lower() in index]
                for w in status.get("workers", [])}
        return self.proc.pid, sorted(owns), owns

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pinned(i: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(i % CORES), *cmd]


def wait_rusage(p: subprocess.Popen[str], timeout: float) -> tuple[str, float]:
    """Wait for ``p`` and return its output and the CPU seconds it (and its children) used."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            p.kill()
            raise RuntimeError(f"{p.args} did not finish in {timeout:.0f} s")
        time.sleep(0.05)
    p.returncode = os.waitstatus_to_exitcode(status)
    out = p.stdout.read() if p.stdout is not None else ""
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, p.args))} failed ({p.returncode}): {out[-500:]}")
    return out, ru.ru_utime + ru.ru_stime


def measure(d: Daemon, name: str, cmds: list[list[str]], timeout: float,
            count: Callable[[str], int]) -> Phase:
    """Run every client at once (client i pinned to core i % cores) and account the daemon's CPU over the run."""
    control, workers, owns = d.processes()
    procs = [control, *workers]
    before = [cpu_s(p) for p in procs]
    start = time.monotonic()
    clients = [subprocess.Popen(pinned(i, c), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace") for i, c in enumerate(cmds)]
    outs = [wait_rusage(c, timeout) for c in clients]
    seconds = time.monotonic() - start
    used = [cpu_s(p) - b for p, b in zip(procs, before, strict=True)]
    per_target = [count(o) for o, _ in outs]
    commands = sum(per_target)
    initiators = sum(cpu for _, cpu in outs)
    if workers:
        return Phase(name, commands / seconds, commands, seconds, used[0], used[1:],
                     [sum(per_target[t] for t in owns[w]) for w in workers], initiators)
    return Phase(name, commands / seconds, commands, seconds, None, used, [commands], initiators)


def perf_commands(out: str) -> int:
    """iscsi-perf prints the commands of each second; their sum is the run's."""
    cur = [int(i) for i in re.findall(r"iops current (\d+)", out.replace("\r", "\n"))]
    if not cur:
        raise RuntimeError(f"iscsi-perf gave no figure: {out[-300:]}")
    return sum(cur)


def run_row(tmp: Path, workers: int, flag: bool, seconds: int) -> Row:
    d = Daemon(tmp, workers, workers if flag else None)
    try:
        control, kids, owns = d.processes()
        row = Row(workers, f"control pid {control} + workers " + ", ".join(
            f"{k} (targets {owns[k]})" for k in kids) if kids else f"one process, pid {control}")
        reads = measure(d, "4 KiB random read, QD32 (iscsi-perf)", [
            ["iscsi-perf", "-r", "-m", "32", "-b", "8", "-t", str(seconds), "-i",
             f"iqn.2026-11.io.lunsync:scale-init{i}", url] for i, url in enumerate(d.urls)],
            seconds + 60, perf_commands)
        row.phases.append(reads)
        # As many writes per client as it read in half the time: the write phase lasts about as long.
        per_client = max(2000, int(reads.iops / len(d.urls) * seconds / 2))
        per_client = min(per_client, LUN_BYTES // 4096 * 4)
        row.phases.append(measure(d, "4 KiB write, QD32 (qemu-img bench -w)", [
            ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-w", "-d", "32", "-s", "4096", "-c",
             str(per_client), url] for url in d.urls], seconds * 20 + 60, lambda _: per_client))
        return row
    finally:
        d.stop()


def ceiling_here(workers: int, ph: Phase) -> float:
    """Commands per second this machine's CPU allows: each worker has at most one core, and the workers, the
    control and the initiators together at most all of them."""
    return min(workers * 1e6 / ph.worker_us, CORES * 1e6 / (ph.worker_us + ph.control_us + ph.initiator_us))


def report(rows: list[Row], skipped: list[str]) -> None:
    from lunsync.target import native

    print(f"\nscaling: N targets on N workers, one pinned initiator per target, on this {CORES}-core machine, "
          f"{native.describe()} build")
    if CORES <= 2:
        print(f"note: the initiators and the workers share these {CORES} cores (the initiators' CPU per command is in "
              "the table), so the aggregate here is bounded by the machine, not by the workers alone")
    for line in skipped:
        print(line)
    print(f"{'workers':>7} {'workload':<40} {'IOPS':>8} {'worker us/cmd':>13} {'control us/cmd':>14} "
          f"{'initiator us/cmd':>16} {'worker busy':>12} {'CPU bound here':>14}")
    for row in rows:
        for ph in row.phases:
            ctl = "-" if ph.control_cpu_s is None else f"{ph.control_us:.1f}"
            busy = "/".join(f"{s / ph.seconds * 100:.0f}%" for s in ph.worker_cpu_s)
            each = "/".join(f"{u:.1f}" for u in ph.each_worker_us)
            print(f"{row.workers:>7} {ph.name:<40} {ph.iops:>8.0f} {each:>13} {ctl:>14} "
                  f"{ph.initiator_us:>16.1f} {busy:>12} {ceiling_here(row.workers, ph):>14.0f}")
        print(f"{'':>7}   ({row.processes})")
    by_phase: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for ph in row.phases:
            by_phase.setdefault(ph.name, []).append((row.workers, ph.iops))
    for name, runs in by_phase.items():
        if len(runs) > 1:
            (w1, a), (w2, b) = runs[0], runs[-1]
            print(f"{name}: {w2} workers / {w1} worker = {b / a:.2f}x aggregate IOPS")
    top = rows[-1]
    print(f"\nmodelled 16-core figure, from the {top.workers}-worker run above:")
    for ph in top.phases:
        w, c = ph.worker_us, ph.control_us
        print(f"  {ph.name}: 16e6 / (w {w:.1f} + c {c:.1f} us) = {16e6 / (w + c):,.0f} IOPS")
    print("  method: w is the workers' CPU (utime+stime from /proc/PID/stat) per command measured in that run, c the "
          "control's (logins and hand-offs, off the data path); one core completes 1e6 / (w + c) commands a second, "
          "16 cores 16 times that, assuming the initiators run elsewhere, the device is not the limit, and the cost "
          "per command stays as measured when each core has its own worker. The 'CPU bound here' column is the same "
          f"model on this machine: the lower of one core per worker (workers * 1e6 / w) and {CORES} cores shared with "
          "the initiators (cores * 1e6 / (w + c + i)); a measured IOPS well below it, with the workers not busy, "
          "means the round trip at QD32 limited the run, not the CPU.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8, help="length of the read phase (the write phase about the same)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure")
    a = ap.parse_args()
    counts = [int(w) for w in a.workers.split(",")]
    flag = has_workers_option()
    rows: list[Row] = []
    skipped: list[str] = []
    for w in counts:
        if w > 1 and not flag:
            skipped.append(f"workers {w}: skipped: this lunsync serve has no --workers option, so it serves every "
                           "target from one process")
            continue
        with tempfile.TemporaryDirectory(prefix="lunsync-scaling-",
                                         dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
            rows.append(run_row(Path(tmp), w, flag, a.seconds))
    if not rows:
        print("scaling: nothing measured", file=sys.stderr)
        return 1
    report(rows, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())

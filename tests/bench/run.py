"""``make bench``: the shared tgt comparison against a fresh daemon, then lunsync's own benchmarks, as one table.

Starts ``lunsync serve --demo --workers 1`` (one process; thin 1 GiB LUN, write cache on) in a temporary data dir on a free loopback port,
runs ``SHARED/tools/bench`` against it (tgt started by that tool beside it, A B A B), then the snapshot and resync
benchmarks in ``tests/snapshots`` and ``tests/provider``, the RBD one in ``tests/bench/bench_rbd.py``, and three runs
of ``tests/bench/hotpath.py`` (CPU per command without a client). The copy-on-write iSCSI bench runs twice: on the
temporary directory's file system, and on a fresh XFS file system with reflink on a loop device (an image of
``XFS_GIB`` GiB, 4, fully allocated and attached with direct I/O, so that neither the image's own block allocation
nor a second page cache enters the figures), where the pool's large copies are reflinks; that run is skipped with
its reason when the machine cannot make one (not root, no ``mkfs.xfs``, no loop device). Prints one table headed
with the date and the machine, the form the README quotes. Figures are ratios from one run; absolute numbers depend on how busy the machine
is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lunsync.target import native

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
IQN = "iqn.2026-11.io.lunsync:demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Linux {platform.release()}, Python {platform.python_version()}"


def start_daemon(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(data_dir.parent / "daemon.log", "wb")  # noqa: SIM115 - the daemon writes to it for its whole life
    proc = subprocess.Popen([PY, "-m", "lunsync.provider.cli", "serve", "--demo", "--data-dir", str(data_dir),
                             "--listen", f"127.0.0.1:{port}", "--api", "off", "--metrics", "off",
                             # One process, as the README's table was measured: the demo's one target is one
                             # worker's anyway, and tests/bench/scaling.py measures workers.
                             "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"lunsync serve did not start; see {data_dir.parent / 'daemon.log'}")


def steer_pid_for_tgtadm() -> None:
    """The shared bench tool gives tgtd the control port ``20000 + pid % 20000`` of its own PID, and tgtadm refuses
    ports above 32767: with a PID whose remainder passes 12767 the tool dies before measuring anything. As root,
    set the next PID (``ns_last_pid``) so the tool's lands in range; otherwise burn PIDs with short children."""
    def next_ok() -> bool:
        return (int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 1) % 20000 <= 12767
    try:
        if not next_ok():
            last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
            want = (last // 20000 + 1) * 20000 + 1000
            if want >= int(Path("/proc/sys/kernel/pid_max").read_text()):
                want = 1000  # PIDs wrap: the next free one above 1000, whose remainder is small
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(want))
    except OSError:
        for _ in range(20000):
            if next_ok():
                break
            subprocess.run(["true"], check=False)


@contextlib.contextmanager
def xfs_mount(where: Path) -> Iterator[Path | str]:
    """A fresh XFS file system with reflink mounted under ``where`` from a loop device, unmounted, detached and
    deleted after; or, instead of its mount point, why there is none."""
    if os.geteuid() != 0:
        yield "skipped: a loop device needs root"
        return
    if shutil.which("mkfs.xfs") is None or shutil.which("losetup") is None:
        yield "skipped: mkfs.xfs (xfsprogs) or losetup not installed"
        return
    image, mnt = where / "xfs.img", where / "xfs"
    with contextlib.ExitStack() as undo:
        try:
            fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            undo.callback(image.unlink)
            try:
                os.posix_fallocate(fd, 0, int(os.environ.get("XFS_GIB", "4")) << 30)
            finally:
                os.close(fd)
            subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True,
                           check=True)
            loop = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", str(image)], capture_output=True,
                                  text=True, check=True).stdout.strip()
            undo.callback(subprocess.run, ["losetup", "-d", loop], check=False)
            mnt.mkdir()
            subprocess.run(["mount", loop, str(mnt)], capture_output=True, text=True, check=True)
            undo.callback(subprocess.run, ["umount", str(mnt)], check=False)
        except subprocess.CalledProcessError as exc:
            yield f"skipped: {' '.join(exc.cmd[:2])} failed: {exc.stderr.strip()}"
            return
        except OSError as exc:
            yield f"skipped: no XFS image: {exc}"
            return
        yield mnt


def on_xfs(cmd: list[str]) -> tuple[str, str]:
    """``cmd`` run again with ``BENCH_DIR`` on a fresh XFS file system: its section of the table."""
    title = f"the same on XFS with reflink (loop device): BENCH_DIR=XFS {' '.join(cmd[1:])}"
    with tempfile.TemporaryDirectory(prefix="lunsync-xfs-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as t, \
            xfs_mount(Path(t)) as mnt:
        if isinstance(mnt, str):
            print(f"{title}: {mnt}", flush=True)
            return title, mnt
        return title, run(cmd, 1800, {"BENCH_DIR": str(mnt)})


def run(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> str:
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, cwd=REPO, check=False,
                       env=None if env is None else {**os.environ, **env})
    out = p.stdout + (f"\n[exit {p.returncode}] {p.stderr[-2000:]}" if p.returncode else "")
    print(out, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared/ folder with tools/bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    a = ap.parse_args()
    bench = Path(a.shared) / "tools" / "bench"
    if not bench.exists():
        print(f"bench: {bench} not found (pass --shared)", file=sys.stderr)
        return 2
    sections: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="lunsync-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        data = Path(tmp) / "data"
        port = free_port()
        proc = start_daemon(data, port)
        try:
            url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
            steer_pid_for_tgtadm()
            sections.append((f"lunsync vs tgt: {bench} {url} --rounds {a.rounds} --seconds {a.seconds}",
                             run([PY, str(bench), url, "--rounds", str(a.rounds), "--seconds", str(a.seconds)],
                                 timeout=1800)))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    own = [
        *((f"CPU per command without a client, run {i + 1} of 3: tests/bench/hotpath.py",
           [PY, "tests/bench/hotpath.py"]) for i in range(3)),
        ("copy-on-write 4 KiB random-write IOPS: tests/snapshots/bench_cow.py iops",
         [PY, "tests/snapshots/bench_cow.py", "iops"]),
        ("copy-on-write through iSCSI, with the A/A noise: tests/snapshots/bench_cow.py iscsi",
         [PY, "tests/snapshots/bench_cow.py", "iscsi"]),
        ("snapshot set of 8 x 10 GiB LUNs under 4 KiB random writes: tests/snapshots/bench_cow.py set",
         [PY, "tests/snapshots/bench_cow.py", "set"]),
        ("resync: tests/provider/bench_resync.py", [PY, "tests/provider/bench_resync.py"]),
        ("RBD: 128 KiB sequential, rbd bench vs lunsync on the same cluster: tests/bench/bench_rbd.py",
         [PY, "tests/bench/bench_rbd.py"]),
        ("RBD snapshot set hold and resync first read: tests/bench/rbd_snapshots.py",
         [PY, "tests/bench/rbd_snapshots.py"]),
        ("scaling: N targets on N workers, pinned initiators, 4 KiB QD32: tests/bench/scaling.py",
         [PY, "tests/bench/scaling.py"]),
        ("snapshot set of 2 LUNs on 2 workers vs one process, writes held: tests/bench/cross_set_hold.py",
         [PY, "tests/bench/cross_set_hold.py"]),
    ]
    for title, cmd in own:
        if (REPO / cmd[1]).exists():
            sections.append((title, run(cmd, timeout=1800)))
            if cmd[1:] == ["tests/snapshots/bench_cow.py", "iscsi"]:
                sections.append(on_xfs(cmd))
    print()
    print(f"lunsync benchmarks, {datetime.date.today().isoformat()}, {machine()}, {native.describe()} build "
          f"({sys.executable})")
    for title, out in sections:
        print(f"\n## {title}")
        keep = [line for line in out.splitlines() if line.strip() and not line.startswith("+")]
        print("\n".join(keep[-20:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

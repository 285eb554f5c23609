"""Python cost per command on the data path, without a network or a client: a profiling aid for the hot path.

Drives the real :class:`~lunsync.target.portal.IscsiProtocol` (connection state machine, SCSI dispatch table,
CowVolume over a FileBackend, statistics) through a transport that only collects what would be sent, and feeds it
batches of pipelined 4 KiB READ(10) or WRITE(10) commands, as a QD32 initiator's socket reads deliver them. It prints
microseconds of CPU per command for each layer, so a change to the hot path can be judged without the noise of a
shared machine's client and scheduler. After the commands it times the bare system calls on the same file with the
same offsets (a loop of 4 KiB ``os.pwritev`` and ``os.preadv``), the floor under each figure: what a command costs
above it is the Python around the call. Run: ``python tests/bench/hotpath.py [N] [--only read|write] [--fill-kib K]``
(``--only`` runs one of the two, for a profiler to see it alone; ``--fill-kib`` writes the LUN in K KiB pieces before
the run, 128 by default as the shared bench fills a LUN: on ext4 with large folios the piece size sets the size of
the page-cache folios, and with them what each later 4 KiB ``pwritev`` costs the kernel).
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

from lunsync.snapshots.backend import FileBackend
from lunsync.snapshots.cow import CowVolume
from lunsync.snapshots.model import LunIdentity
from lunsync.target import keys, native, pdu
from lunsync.target.directory import Directory, PortalAddress, TargetEntry
from lunsync.target.portal import IscsiProtocol, Server
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.target import ScsiTarget

IQN = "iqn.2026-11.io.lunsync:hotpath"
ISID = 0x23D000000001
QD = 32


class _Sink(asyncio.Transport):
    """Counts what the protocol sends; never blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.pdus = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def writelines(self, data: object) -> None:
        self.pdus += 1

    def write(self, data: object) -> None:
        self.pdus += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


def _login() -> bytes:
    data = keys.encode_text([("InitiatorName", "iqn.2026-11.org.example:bench"), ("TargetName", IQN),
                             ("SessionType", "Normal"), ("ImmediateData", "Yes"), ("InitialR2T", "Yes"),
                             ("MaxRecvDataSegmentLength", "262144")])
    bhs = struct.pack(">BBBBB3s6sHIHxxII16x", 0x43, 0x87, 0, 0, 0, len(data).to_bytes(3, "big"),
                      ISID.to_bytes(6, "big"), 0, 0, 0, 1, 0)
    return bhs + data + pdu.padding(len(data))


def _cmd(op: int, lba: int, itt: int, cmd_sn: int, data: bytes = b"") -> bytes:
    write = op == 0x2A
    cdb = struct.pack(">BBIBHB", op, 0, lba, 0, 8, 0).ljust(16, b"\0")
    flags = 0x80 | (0x20 if write else 0x40) | 1
    return struct.pack(">BBxxB3s8sIIII16s", 0x01, flags, 0, len(data).to_bytes(3, "big"), pdu.encode_lun(0), itt,
                       4096, cmd_sn, 0, cdb) + data


def _feed(proto: IscsiProtocol, blob: bytes) -> None:
    view = proto.get_buffer(len(blob))
    view[:len(blob)] = blob
    proto.buffer_updated(len(blob))


async def _run(n: int, tmp: Path, only: str | None, fill_kib: int) -> None:
    backend = FileBackend.create(tmp / "lun.img", 1 << 30, 512, overwrite=True)
    fill = os.urandom(fill_kib << 10)  # by default as the shared bench fills a LUN: 128 KiB writes
    for off in range(0, 1 << 30, len(fill)):
        os.pwrite(backend.fileno(), fill, off)
    os.fsync(backend.fileno())  # rewriting pages still under writeback would measure the disk, not the code
    cow = CowVolume(backend, None, 1, 65536, name="hotpath")
    lu = LogicalUnit(cow, LunIdentity("HOTPATH0", bytes(16)), name="lun0")
    directory = Directory()
    directory.add(TargetEntry(IQN, ScsiTarget(IQN, {0: lu})))
    directory.portals.append(PortalAddress("127.0.0.1", 3260, 1))
    proto = IscsiProtocol(Server(directory))
    sink = _Sink()
    proto.connection_made(sink)
    _feed(proto, _login())
    if proto.conn is None or proto.conn.result is None:
        raise SystemExit("hotpath: the login failed")
    cmd_sn = 1
    itt = 1
    data = os.urandom(4096)
    _feed(proto, _cmd(0x00, 0, 0xFFFF, cmd_sn))  # takes the POWER ON unit attention
    cmd_sn += 1
    lu_stats = proto.server.stats.lun("lun0")
    print(f"hotpath: {native.describe()} build")
    for op, label in ((0x2A, "WRITE(10) 4 KiB"), (0x28, "READ(10) 4 KiB")):
        if only is not None and label.split("(")[0].lower() != only:
            continue
        batches = []
        for b in range(n // QD):
            parts = []
            for i in range(QD):
                lba = ((b * QD + i) * 7919 % 262144) * 8
                parts.append(_cmd(op, lba, itt, cmd_sn, data if op == 0x2A else b""))
                itt = (itt + 1) & 0xFFFFFF
                cmd_sn += 1
            batches.append(b"".join(parts))
        cpu = time.process_time()
        wall = time.perf_counter()
        for blob in batches:
            _feed(proto, blob)
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
        count = len(batches) * QD
        done = lu_stats.io.writes if op == 0x2A else lu_stats.io.reads
        note = ""
        if done < count:
            # A write that held the loop over the backend's stall limit (a busy machine preempting us) sends the
            # LUN's writes to its I/O threads for a while: those finish as tasks, and the figure is not the inline
            # path's alone.
            await proto.drain()
            note = f"; {count - done} finished on the LUN's I/O threads after a stalled write, not comparable"
            done = lu_stats.io.writes if op == 0x2A else lu_stats.io.reads
        if done < count:
            raise SystemExit(f"hotpath: only {done} of {count} commands completed")
        print(f"{label:18s} {cpu / count * 1e6:6.2f} us CPU/command ({wall / count * 1e6:6.2f} us wall), "
              f"{count} commands in batches of {QD}{note}")
    _floor(backend.fileno(), n, data, only)
    proto.transport = None
    await cow.close()


def _floor(fd: int, n: int, data: bytes, only: str | None) -> None:
    """The bare system calls under the figures: 4 KiB at the commands' offsets, nothing else in the loop."""
    offsets = [((i * 7919) % 262144) * 4096 for i in range(n)]
    buf = bytearray(data)
    for label, call in (("write", lambda off: os.pwritev(fd, [buf], off)),
                        ("read", lambda off: os.preadv(fd, [buf], off))):
        if only is not None and label != only:
            continue
        cpu = time.process_time()
        for off in offsets:
            call(off)
        cpu = time.process_time() - cpu
        print(f"floor: bare 4 KiB os.p{label}v {cpu / n * 1e6:6.2f} us CPU/call, same file and offsets")


def main() -> int:
    args = sys.argv[1:]
    only = None
    if "--only" in args:
        i = args.index("--only")
        only = args[i + 1] if i + 1 < len(args) else ""
        if only not in ("read", "write"):
            raise SystemExit("hotpath: --only takes read or write")
        del args[i:i + 2]
    fill_kib = 128
    if "--fill-kib" in args:
        i = args.index("--fill-kib")
        fill_kib = int(args[i + 1]) if i + 1 < len(args) else 0
        if fill_kib < 4 or (1 << 30) % (fill_kib << 10):
            raise SystemExit("hotpath: --fill-kib takes a power of two from 4 to 1048576")
        del args[i:i + 2]
    n = int(args[0]) if args else 100_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        asyncio.run(_run(n, Path(d), only, fill_kib))
    return 0


if __name__ == "__main__":
    sys.exit(main())

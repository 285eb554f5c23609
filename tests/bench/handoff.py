"""What handing sessions to worker processes costs: per login, and per control/worker call.

With one event loop per core the portal logs in and then gives the socket to the process owning the target; after
that the session's commands never cross a process boundary, so their CPU is what ``tests/bench/hotpath.py`` measures.
What the hand-off adds is paid once per login, and management calls pay one channel round trip. This script measures
both on loopback: a login (connect, Login, one TEST UNIT READY answered, close) against a portal that serves the
target itself, and against a portal handing it to a worker process (``tests/provider/handoff_worker.py``), interleaved
A/B, medians; and a Call/Reply round trip over a channel (two ends in one process, so codec and system calls, without
a second scheduler). Run: ``python tests/bench/handoff.py [LOGINS] [CALLS]``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lunsync.provider.channel import Channel, SessionRouter
from lunsync.provider.rpc import Call, Message, Notice, Reply
from lunsync.snapshots.backend import StoreSpec, open_store
from lunsync.snapshots.model import LunIdentity
from lunsync.target import native, pdu
from lunsync.target.directory import Directory, TargetEntry
from lunsync.target.portal import Server
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.target import ScsiTarget

from tests.target.test_connection import login_pdu, scsi_cmd

IQN = "iqn.2026-11.io.lunsync:handoff"
PAIRS = [("InitiatorName", "iqn.2026-11.org.example:bench"), ("TargetName", IQN), ("SessionType", "Normal")]


async def _read_pdu(r: asyncio.StreamReader) -> bytes:
    head = await r.readexactly(48)
    rest = pdu.frame_length(head, False, False) - 48
    if rest:
        await r.readexactly(rest)
    return head


async def one_login(port: int) -> float:
    started = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(login_pdu(PAIRS))
    rsp = await _read_pdu(r)
    assert rsp[0] == 0x23 and rsp[36] == 0, rsp.hex()
    w.write(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
    assert (await _read_pdu(r))[0] == 0x21
    elapsed = time.perf_counter() - started
    w.close()
    await w.wait_closed()
    return elapsed


async def logins(n: int, work: Path, mine: socket.socket) -> tuple[float, float]:
    dev = open_store("file", StoreSpec(str(work / "local.img"), 64 << 20))
    lu = LogicalUnit(dev, LunIdentity(naa=bytes.fromhex("6001405" + "1" * 25), serial="local0"), name="lun0")
    local_dir = Directory()
    local_dir.add(TargetEntry(IQN, ScsiTarget(IQN, {0: lu})))
    local = Server(local_dir)
    _, local_port = await local.listen("127.0.0.1", 0)

    ready = asyncio.Event()
    control_dir = Directory()
    control_dir.add(TargetEntry(IQN, ScsiTarget(IQN)))
    control = Server(control_dir, hand_off=SessionRouter(lambda name: channel))

    def on_message(msg: Message, sock: socket.socket | None) -> None:
        if isinstance(msg, Notice) and msg.event == "ready":
            ready.set()

    channel = Channel(mine, on_message)
    await asyncio.wait_for(ready.wait(), 30)
    _, control_port = await control.listen("127.0.0.1", 0)
    plain: list[float] = []
    handed: list[float] = []
    for _ in range(n):  # A B A B: a load spike on a shared machine hits both
        plain.append(await one_login(local_port))
        handed.append(await one_login(control_port))
    channel.close()
    await control.stop()
    await local.stop()
    await dev.close()
    return statistics.median(plain), statistics.median(handed)


async def calls(n: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def answer(msg: Message, sock: socket.socket | None) -> None:
        if isinstance(msg, Call):
            server.send(Reply(msg.id, {"ok": True}))

    client = Channel(a, lambda m, s: None)
    server = Channel(b, answer)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await client.call("ping", {"luns": ["db0", "db1"]})
        times.append(time.perf_counter() - started)
    client.close()
    server.close()
    return statistics.median(times)


def main() -> None:
    n_logins = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    n_calls = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = subprocess.Popen([sys.executable, "-m", "tests.provider.handoff_worker", str(theirs.fileno()),
                                   str(Path(tmp) / "worker.img"), IQN], pass_fds=[theirs.fileno()], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        theirs.close()
        plain, handed = asyncio.run(logins(n_logins, Path(tmp), mine))  # closing its channel stops the worker
        worker.wait(10)
    rtt = asyncio.run(calls(n_calls))
    print(f"data path: {native.describe()}")
    print(f"login + first command, portal serving the target itself : {plain * 1e3:7.3f} ms (median of {n_logins})")
    print(f"login + first command, portal handing it to a worker    : {handed * 1e3:7.3f} ms (median of {n_logins})")
    print(f"hand-off cost per session                               : {(handed - plain) * 1e3:7.3f} ms")
    print(f"control/worker call round trip                          : {rtt * 1e6:7.1f} us (median of {n_calls})")


if __name__ == "__main__":
    main()

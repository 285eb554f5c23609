"""The worker pool: a worker killed with -9 in the middle of qemu-io's writes is restarted, the initiator logs in
again through the portal and finishes, and every write it was acknowledged is on the LUN; a worker that keeps dying
young is restarted with a growing back-off."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop
from lunsync.provider import workers
from lunsync.provider.channel import SessionRouter, control_message
from lunsync.provider.rpc import Message
from lunsync.provider.workers import WorkerPool
from lunsync.target.directory import Directory, TargetEntry
from lunsync.target.portal import Server
from lunsync.target.scsi.target import ScsiTarget

from tests.e2e.harness import REPO_ROOT, require_tools

IQN = "iqn.2026-11.io.lunsync:handoff"
MiB = 1 << 20
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _portal(pool_box: list[WorkerPool]) -> Server:
    directory = Directory()
    directory.add(TargetEntry(IQN, ScsiTarget(IQN)))
    return Server(directory, hand_off=SessionRouter(lambda name: pool_box[0].channel(0)))


@pytest.mark.e2e
def test_a_worker_killed_mid_io_is_restarted_and_qemu_io_finishes_with_every_write_kept(tmp_path: Path) -> None:
    require_tools("qemu-io")
    lun = tmp_path / "lun0.img"
    box: list[WorkerPool] = []
    server = _portal(box)

    def on_message(index: int, msg: Message, sock: socket.socket | None) -> None:
        control_message(server, msg)

    def on_down(index: int) -> None:
        server.remote_sessions_lost(lambda state: True)

    pool = WorkerPool(1, lambda i, fd: [sys.executable, "-m", "tests.provider.handoff_worker", str(fd), str(lun),
                                        IQN], on_message, on_down, env=ENV)
    box.append(pool)

    async def go() -> None:
        await pool.start()
        first_pid = pool.workers[0].pid
        _, port = await server.listen("127.0.0.1", 0)
        url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
        writes = [c for i in range(32) for c in ("-c", f"write -P 0x{0x40 + i:02x} {i * MiB} {MiB}")]
        qemu = await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", *writes, url, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT)
        # Kill the worker once the first writes are on the LUN and qemu-io is still writing.
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while await asyncio.to_thread(_byte_at, lun, 2 * MiB) != 0x42:
            assert loop.time() < end and qemu.returncode is None, "qemu-io finished before the kill"
            await asyncio.sleep(0.005)
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        out, _ = await asyncio.wait_for(qemu.communicate(), 120)
        assert qemu.returncode == 0, out.decode()
        assert pool.workers[0].restarts == 1 and pool.workers[0].pid != first_pid
        text = out.decode()
        assert text.count("wrote 1048576/1048576 bytes") == 32, text
        for i in (0, 2, 31):  # read back through the restarted worker, over a fresh session
            p = await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", "-c", f"read -P 0x{0x40 + i:02x} "
                                                     f"{i * MiB} {MiB}", url, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT)
            rout, _ = await asyncio.wait_for(p.communicate(), 60)
            assert p.returncode == 0 and b"Pattern verification failed" not in rout, rout.decode()
        await pool.stop()
        await server.stop()

    uvloop.run(go())
    data = lun.read_bytes()
    assert all(data[i * MiB:(i + 1) * MiB] == bytes([0x40 + i]) * MiB for i in range(32))


def _byte_at(path: Path, offset: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            b = f.read(1)
    except FileNotFoundError:
        return -1
    return b[0] if b else -1


def test_a_worker_that_keeps_dying_young_is_restarted_with_a_growing_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(workers, "BACKOFF_MAX_S", 0.08)
    downs: list[int] = []

    async def go() -> WorkerPool:
        pool = WorkerPool(1, lambda i, fd: [sys.executable, "-c", "import sys; sys.exit(3)"],
                          lambda i, m, s: None, downs.append)
        pool.workers[0].backoff_s = workers.BACKOFF_FIRST_S
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.start(), 1.5)
        await pool.stop()
        return pool

    pool = uvloop.run(go())
    w = pool.workers[0]
    assert len(downs) >= 3 and w.restarts >= 3 and not w.up and pool.channel(0) is None
    assert w.backoff_s == workers.BACKOFF_MAX_S  # doubled each time, up to the bound

"""The control/worker channel: a socket rides with its hand-off, calls meet their replies, a broken frame closes the
channel; and a portal that only logs in hands real initiators' sessions to another process, which serves them
(qemu-io's writes read back), with session reinstatement and the control's session table kept across the hand-off."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvloop
from lunsync.provider.channel import Channel, ChannelClosed, RemoteError, SessionRouter, control_message
from lunsync.provider.rpc import Call, HandOff, Message, Notice, Reply
from lunsync.target import keys, pdu
from lunsync.target.directory import Directory, TargetEntry
from lunsync.target.handoff import SessionState
from lunsync.target.portal import Server
from lunsync.target.scsi.target import ScsiTarget

from tests.e2e.harness import REPO_ROOT, require_tools
from tests.target.test_connection import login_pdu, scsi_cmd

IQN = "iqn.2026-11.io.lunsync:handoff"
INITIATOR = "iqn.2026-11.org.example:raw"
STATE = SessionState(INITIATOR, "", 0x23D000000001, 7, 0, IQN, keys.NegotiatedParams.defaults(), "none", 10, 2, 129,
                     "127.0.0.1:1", b"", b"")


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_a_socket_rides_with_its_hand_off_and_calls_meet_their_replies() -> None:
    async def go() -> None:
        a, b = _pair()
        got: list[tuple[Message, socket.socket | None]] = []
        arrived = asyncio.Event()

        def on_b(msg: Message, sock: socket.socket | None) -> None:
            if isinstance(msg, Call):
                reply = Reply(msg.id, {"echo": msg.params}) if msg.method == "echo" else Reply(msg.id, None, "no", 404)
                server.send(reply)
                return
            got.append((msg, sock))
            arrived.set()

        client = Channel(a, lambda m, s: None)
        server = Channel(b, on_b)
        left, right = _pair()
        with left, right:
            assert client.send(HandOff(STATE), left.fileno())
            await asyncio.wait_for(arrived.wait(), 5)
            [(msg, sock)] = got
            assert isinstance(msg, HandOff) and msg.state == STATE and sock is not None
            with sock:
                sock.sendall(b"through the handed-off descriptor")
                assert right.recv(100) == b"through the handed-off descriptor"
        assert await client.call("echo", {"x": 1}) == {"echo": {"x": 1}}
        with pytest.raises(RemoteError) as e:
            await client.call("missing")
        assert e.value.status == 404
        client.close()
        server.close()

    asyncio.run(go())


def test_a_broken_frame_closes_the_channel_and_fails_calls_in_flight() -> None:
    async def go() -> None:
        a, b = _pair()
        closed = asyncio.Event()
        client = Channel(a, lambda m, s: None, closed.set)
        pending = asyncio.ensure_future(client.call("slow"))
        await asyncio.sleep(0.05)
        b.sendall(b"\x00\x00\x00\x02{]")
        await asyncio.wait_for(closed.wait(), 5)
        with pytest.raises(ChannelClosed):
            await pending
        assert not client.send(Notice("late"))
        b.close()

    asyncio.run(go())


# -- a portal and a worker process ---------------------------------------------------------------------------------


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    """A worker subprocess serving IQN on a file LUN in ``tmp_path``, and our end of its channel."""
    mine, theirs = _pair()
    proc = subprocess.Popen([sys.executable, "-m", "tests.provider.handoff_worker", str(theirs.fileno()),
                             str(tmp_path / "lun0.img"), IQN], pass_fds=[theirs.fileno()], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    theirs.close()
    try:
        yield mine, proc
    finally:
        mine.close()  # the worker stops when its channel closes
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def portal(mine: socket.socket) -> AsyncIterator[tuple[Server, int]]:
    """A control-like portal on a loopback port handing every session of IQN to the worker on ``mine``."""
    ready = asyncio.Event()
    directory = Directory()
    directory.add(TargetEntry(IQN, ScsiTarget(IQN)))  # the name only: the LUN lives in the worker
    server = Server(directory, hand_off=SessionRouter(lambda name: channel if name.lower() == IQN else None))

    def on_message(msg: Message, sock: socket.socket | None) -> None:
        if isinstance(msg, Notice) and msg.event == "ready":
            ready.set()
        control_message(server, msg)

    channel = Channel(socket.socket(fileno=os.dup(mine.fileno())), on_message)
    try:
        await asyncio.wait_for(ready.wait(), 20)
        _, port = await server.listen("127.0.0.1", 0)
        yield server, port
    finally:
        channel.close()
        await server.stop()


async def _until(cond: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.e2e
def test_qemu_io_writes_through_a_handed_off_session_read_back(
        tmp_path: Path, worker: tuple[socket.socket, subprocess.Popen[bytes]]) -> None:
    require_tools("qemu-io")

    async def go() -> None:
        async with portal(worker[0]) as (server, port):
            url = f"iscsi://127.0.0.1:{port}/{IQN}/0"
            for cmd in ("write -P 0x5a 0 1M", "read -P 0x5a 0 1M"):
                p = await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", "-c", cmd, url,
                                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                out, _ = await asyncio.wait_for(p.communicate(), 60)
                assert p.returncode == 0 and b"Pattern verification failed" not in out, out.decode()
            assert server.counters.logins == 2
            # Each qemu-io logged out in the worker, which told the portal: its session table is empty again.
            await _until(lambda: len(server.sessions) == 0)

    uvloop.run(go())  # the daemon's loop: its transports hand their sockets over differently from asyncio's
    assert (tmp_path / "lun0.img").read_bytes()[:1 << 20] == b"\x5a" * (1 << 20)


def _login(port: int, isid: int, *, status: int = 0) -> tuple[socket.socket, int]:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    pairs = [("InitiatorName", INITIATOR), ("TargetName", IQN), ("SessionType", "Normal")]
    s.sendall(login_pdu(pairs).replace(bytes.fromhex("23d000000001"), isid.to_bytes(6, "big"), 1))
    bhs = _recv_pdu(s)
    assert bhs[0] == 0x23 and bhs[36] << 8 | bhs[37] == status, bhs.hex()
    return s, int.from_bytes(bhs[14:16], "big")


def _recv_pdu(s: socket.socket) -> bytes:
    head = b""
    while len(head) < 48:
        chunk = s.recv(48 - len(head))
        assert chunk, "connection closed"
        head += chunk
    rest = pdu.frame_length(head, False, False) - 48
    while rest:
        rest -= len(s.recv(rest))
    return head


@pytest.mark.e2e
def test_reinstatement_ends_the_old_session_in_the_worker(
        worker: tuple[socket.socket, subprocess.Popen[bytes]]) -> None:
    async def go() -> None:
        async with portal(worker[0]) as (server, port):
            old, tsih_old = await asyncio.to_thread(_login, port, 0x23D000000042)
            await _until(lambda: tsih_old in server.sessions)
            # The worker serves the first session: a TEST UNIT READY is answered on the handed-off socket.
            old.sendall(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
            rsp = await asyncio.to_thread(_recv_pdu, old)
            assert rsp[0] == 0x21
            new, tsih_new = await asyncio.to_thread(_login, port, 0x23D000000042)  # same ISID: reinstatement
            assert tsih_new != tsih_old
            old.settimeout(5)
            assert await asyncio.to_thread(old.recv, 100) == b""  # the worker dropped the old connection
            assert tsih_old not in server.sessions and tsih_new in server.sessions
            new.sendall(scsi_cmd(bytes(6), itt=1, cmd_sn=1, edtl=0))
            assert (await asyncio.to_thread(_recv_pdu, new))[0] == 0x21
            # A forced logout in the portal reaches the worker, which closes the connection.
            assert server.force_logout(tsih_new)
            new.settimeout(5)
            assert await asyncio.to_thread(new.recv, 100) == b""
            old.close()
            new.close()

    uvloop.run(go())


def test_a_login_whose_target_has_no_process_up_is_answered_service_unavailable() -> None:
    async def go() -> None:
        directory = Directory()
        directory.add(TargetEntry(IQN, ScsiTarget(IQN)))
        server = Server(directory, hand_off=SessionRouter(lambda name: None))
        _, port = await server.listen("127.0.0.1", 0)
        s, tsih = await asyncio.to_thread(_login, port, 0x23D000000043, status=0x0301)
        with s:
            assert tsih == 0
            s.settimeout(5)
            assert await asyncio.to_thread(s.recv, 100) == b""  # and the connection closes after it
        assert len(server.sessions) == 0 and server.counters.logins == 0
        assert server.counters.login_failures == {"service_unavailable": 1}
        await server.stop()

    uvloop.run(go())


def test_a_hand_off_that_raises_costs_the_login_not_the_portal() -> None:
    class Broken:
        def give(self, sock: socket.socket, state: SessionState) -> bool:
            raise RuntimeError("bug")

        def end(self, state: SessionState) -> None:
            pass

    async def go() -> None:
        directory = Directory()
        directory.add(TargetEntry(IQN, ScsiTarget(IQN)))
        server = Server(directory, hand_off=Broken())
        _, port = await server.listen("127.0.0.1", 0)
        for isid in (0x23D000000044, 0x23D000000045):  # the portal still answers the next login the same way
            s, _ = await asyncio.to_thread(_login, port, isid, status=0x0301)
            s.close()
        assert len(server.sessions) == 0
        await server.stop()

    uvloop.run(go())

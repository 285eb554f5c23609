"""The asyncio edge of the control/worker link: one unix stream socket pair per worker, frames of
:mod:`lunsync.provider.rpc` both ways, and a connected iSCSI socket riding along with each hand-off.

A :class:`Channel` owns one end of the pair on the running loop. It sends frames through a queue (a worker that reads
slowly never blocks the control's loop) and reads whatever arrives into a :class:`~lunsync.provider.rpc.FrameDecoder`.
A hand-off's socket travels as SCM_RIGHTS on the first byte of its frame; on a stream the descriptor is delivered by
the receive that reads that byte, which is never after the frame is complete, so received descriptors wait in a FIFO
and each HandOff takes the oldest. :meth:`Channel.call` pairs a Call with its Reply by id. :class:`SessionRouter` is
the control side's :class:`~lunsync.target.portal.HandOff` (each session to the channel of its target's owner) and
:func:`serve_sessions` the worker side (adopt what is given, end what is asked, report what ended). A broken frame
closes the channel: the two ends are one program, so a malformed message is a bug to stop at, not input to survive.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable

from lunsync.provider.rpc import Call, FrameDecoder, HandOff, Json, Message, Notice, Reply, RpcError, encode
from lunsync.target.handoff import SessionState
from lunsync.target.portal import Server

log = logging.getLogger("lunsync.workers")

RECV_BYTES = 256 * 1024
MAX_FDS = 16  # descriptors one receive may carry; hand-offs are one each


class ChannelClosed(ConnectionError):
    """The other end went away (or sent a broken frame): calls in flight fail with this."""


class RemoteError(Exception):
    """A Call the other side answered with an error, and the HTTP status the API should answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Channel:
    """One end of a control/worker socket pair, on the running loop."""

    def __init__(self, sock: socket.socket, on_message: Callable[[Message, socket.socket | None], None],
                 on_closed: Callable[[], None] | None = None) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.on_message = on_message
        self.on_closed = on_closed
        self.decoder = FrameDecoder()
        self.closed = False
        self._out: collections.deque[tuple[bytes | memoryview, int | None]] = collections.deque()
        self._fds: collections.deque[int] = collections.deque()
        self._calls: dict[int, asyncio.Future[Json]] = {}
        self._next_id = 0
        self._writing = False
        self.loop.add_reader(sock.fileno(), self._readable)

    # -- out ----------------------------------------------------------------------------------------------------------

    def send(self, msg: Message, fd: int | None = None) -> bool:
        """Queue ``msg`` (with a duplicate of ``fd``, kept until it is sent); False when the channel is closed."""
        if self.closed:
            return False
        self._out.append((encode(msg), os.dup(fd) if fd is not None else None))
        if not self._writing:
            self._flush()
        return not self.closed

    def _flush(self) -> None:
        out = self._out
        while out:
            data, fd = out[0]
            try:
                n = socket.send_fds(self.sock, [data], [fd]) if fd is not None else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError as e:
                log.warning("worker channel: send failed: %s", e)
                self.close()
                return
            if fd is not None:
                os.close(fd)  # it is in the kernel's hands now, with the first byte sent
            if n < len(data):
                out[0] = (memoryview(data)[n:], None)  # a view: a large reply is not copied again per send
            else:
                out.popleft()
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    async def call(self, method: str, params: dict[str, Json] | None = None) -> Json:
        """Run ``method`` on the other side; its result, or RemoteError / ChannelClosed."""
        self._next_id += 1
        cid = self._next_id
        fut: asyncio.Future[Json] = self.loop.create_future()
        self._calls[cid] = fut
        if not self.send(Call(cid, method, params or {})):
            self._calls.pop(cid, None)
            raise ChannelClosed("the worker channel is closed")
        try:
            return await fut
        finally:
            self._calls.pop(cid, None)

    # -- in -----------------------------------------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, RECV_BYTES, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:  # the other end closed with our last frames unread: a close like EOF
            self.close()
            return
        except OSError as e:
            log.warning("worker channel: receive failed: %s", e)
            self.close()
            return
        self._fds.extend(fds)
        if not data:
            self.close()
            return
        try:
            messages = self.decoder.feed(data)
        except RpcError as e:
            log.error("worker channel: %s; closing it", e)
            self.close()
            return
        for m in messages:
            if isinstance(m, Reply):
                fut = self._calls.get(m.id)
                if fut is not None and not fut.done():
                    if m.error is None:
                        fut.set_result(m.result)
                    else:
                        fut.set_exception(RemoteError(m.error, m.status))
                continue
            sock = None
            if isinstance(m, HandOff):
                if not self._fds:
                    log.error("worker channel: a hand-off arrived without its socket; closing the channel")
                    self.close()
                    return
                sock = socket.socket(fileno=self._fds.popleft())
            try:
                self.on_message(m, sock)
            except Exception:  # one bad message handler must not stop the channel
                log.exception("worker channel: handling %s", type(m).__name__)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        for _, fd in self._out:
            if fd is not None:
                os.close(fd)
        self._out.clear()
        while self._fds:
            os.close(self._fds.popleft())
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("the worker channel closed"))
        self.sock.close()
        if self.on_closed is not None:
            self.on_closed()


def _session_params(state: SessionState) -> dict[str, Json]:
    return {"tsih": state.tsih, "isid": state.isid}


class SessionRouter:
    """The control's HandOff: each logged-in session goes to the channel of the worker owning its target."""

    def __init__(self, channel_of: Callable[[str], Channel | None]) -> None:
        self.channel_of = channel_of

    def give(self, sock: socket.socket, state: SessionState) -> bool:
        ch = self.channel_of(state.target_name)
        return ch is not None and ch.send(HandOff(state), sock.fileno())

    def end(self, state: SessionState) -> None:
        ch = self.channel_of(state.target_name)
        if ch is not None:
            ch.send(Notice("end-session", _session_params(state)))


def control_message(server: Server, msg: Message) -> None:
    """What the control does with a worker's notice about sessions."""
    if isinstance(msg, Notice) and msg.event == "session-closed":
        tsih, isid = msg.params.get("tsih"), msg.params.get("isid")
        if isinstance(tsih, int) and isinstance(isid, int):
            server.remote_session_closed(tsih, isid)


def serve_sessions(server: Server, channel: Channel, msg: Message, sock: socket.socket | None) -> bool:
    """The worker side of hand-offs: adopt a given session, end one the control asks to end. True if ``msg`` was
    about sessions (else it is the caller's)."""
    if isinstance(msg, HandOff) and sock is not None:
        task = channel.loop.create_task(server.adopt(sock, msg.state))
        task.add_done_callback(_log_failure)
        return True
    if isinstance(msg, Notice) and msg.event == "end-session":
        tsih, isid = msg.params.get("tsih"), msg.params.get("isid")
        entry = server.sessions.entry(tsih) if isinstance(tsih, int) else None
        if entry is not None and entry.result.isid == isid:
            server.force_logout(entry.result.tsih)
        return True
    return False


def report_closed_sessions(server: Server, channel: Channel) -> None:
    """Tell the control of every adopted session that ends here, so it forgets the session (and its TSIH)."""
    def closed(state: SessionState) -> None:
        channel.send(Notice("session-closed", _session_params(state)))

    server.on_session_closed = closed


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("adopting a session failed: %s", task.exception())

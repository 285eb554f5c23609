"""The asyncio edge of the data path: listening sockets, one BufferedProtocol per connection, task execution.

Everything protocol-shaped happens in :class:`~lunsync.target.connection.Connection`, and the session table and
task management in :mod:`lunsync.target.session`; this module owns the sockets, timers and asyncio tasks, plugs its
connections into the session table, and drains everything on shutdown. Counters are plain integers read at scrape
time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from lunsync.target import connection as cx
from lunsync.target import execution, handoff
from lunsync.target.directory import Directory
from lunsync.target.errors import LoginStatus
from lunsync.target.handoff import SessionState
from lunsync.target.login import LoginResult
from lunsync.target.pdu import TaskMgmtRequest
from lunsync.target.session import SessionTable, TmfOutcome
from lunsync.target.stats import CommandStats
from lunsync.target.throttle import LoginThrottle

log = logging.getLogger("lunsync.iscsi")

TICK_S = 1.0


@dataclass(slots=True)
class PortalSettings:
    nop_interval_s: float = 30.0
    nop_timeout_s: float = 15.0
    login_timeout_s: float = 15.0
    max_sessions: int = 256
    # The portal group tag of every portal (RFC 7143 §4.2.7.1), also the relative target port identifier: one per
    # gateway when several serve the same LUNs, so that each is its own SCSI target port and ALUA port group.
    tpgt: int = 1
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1048576
    first_burst_length: int = 262144


@dataclass(slots=True)
class Counters:
    """Hot-path counts as plain integers; the metrics collector reads them at scrape time."""

    logins: int = 0
    logouts: int = 0
    login_failures: collections.Counter[str] = field(default_factory=collections.Counter)
    rejects: collections.Counter[str] = field(default_factory=collections.Counter)
    connections: int = 0
    throttled_connections: int = 0


class HandOff(Protocol):
    """Where a portal that only logs in sends its normal sessions (the control process of ``--workers``)."""

    def give(self, sock: socket.socket, state: SessionState) -> bool:
        """Pass ``sock`` (a duplicate the caller closes after) and the session to its target's owner; False when the
        owner cannot take it now, and the login is then dropped for the initiator to retry."""
        ...

    def end(self, state: SessionState) -> None:
        """Ask the owner to end a session it was given (reinstatement here, or a forced logout)."""
        ...


class IscsiProtocol(asyncio.BufferedProtocol):
    """One TCP connection; once logged in, a :class:`lunsync.target.session.Session` of the session table.

    Two variants besides the plain one: on a portal with a :class:`HandOff`, a normal session's connection is given
    away at the end of its login and stays in the session table as the record of a session served elsewhere
    (``given``); on a worker, a connection is made from a socket and a :class:`SessionState` another process gave
    (``adopted``)."""

    def __init__(self, server: Server, adopted: SessionState | None = None) -> None:
        self.server = server
        self.adopted = adopted
        self.given: SessionState | None = None
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn: cx.Connection | None = None
        # The per-command half, compiled; it holds the state each command reads (see lunsync.target.execution).
        # It reaches back through a weak proxy: a cycle between the two would leave a closed connection, with its
        # receive buffers, to the cyclic collector, which a compiled data path that allocates little runs seldom
        # (fuzzing with oversized segments grew the daemon by 300 MiB).
        self.run = execution.TaskRunner(cast(execution.PortalHost, weakref.proxy(self)), server.stats)
        self.tasks = self.run.tasks  # commands that suspended, by tag
        self.lun_io = self.run.lun_io  # per LUN number of this session, for the API's session list
        self.peer = "?"
        self.timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.logged_in = False
        self.done = asyncio.Event()
        self.close_reason: str | None = None

    # -- asyncio callbacks --------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they behave as one.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        name = transport.get_extra_info("sockname")
        local = (str(name[0]), int(name[1])) if isinstance(name, tuple) and len(name) >= 2 else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        s = self.server.settings
        self.conn = self.run.conn = cx.Connection(
            self.server.directory, peer=self.peer, local=local, tpgt=s.tpgt, now=self.loop.time(),
            nop_interval_s=s.nop_interval_s, nop_timeout_s=s.nop_timeout_s, login_timeout_s=s.login_timeout_s,
            target_limits=self.server.target_limits(), allocate_tsih=self.server.sessions.allocate_tsih,
            hand_off=self.server.hand_off is not None,
        )
        self.server.protocols.add(self)
        self.server.counters.connections += 1
        self.timer = self.loop.call_later(TICK_S, self._tick)
        if self.adopted is not None:
            self._adopt(self.adopted)
            return
        hold = self.server.throttle.delay(self.source, self.loop.time())
        if hold > 0:
            # This address keeps failing logins: read nothing from it for a while (see lunsync.target.throttle).
            self.server.counters.throttled_connections += 1
            self.transport.pause_reading()
            self.loop.call_later(hold, self._unhold)

    def _adopt(self, state: SessionState) -> None:
        # The final Login Response was left for this process to send, so nothing of this session is ever written
        # by two processes; then the session goes on with whatever the initiator sent behind its login.
        assert self.transport is not None and self.conn is not None
        self.transport.write(state.outgoing)
        try:
            handoff.adopt(self.conn, state, self.server.directory, self.loop.time())
        except handoff.HandOffError as e:
            log.warning("cannot adopt session tsih=%d of %s: %s", state.tsih, state.initiator_name, e)
            self.close()
            return
        self.pump()

    def _give(self, out: list[cx.Out]) -> None:
        # Called once, when the login stopped at HANDED_OFF: ``out`` holds the final Login Response, unsent.
        conn, transport = self.conn, self.transport
        assert conn is not None and transport is not None
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size():
            # An earlier Login Response still sits in our buffer: the stream cannot change writers mid-way.
            log.warning("login of %s from %s: output still queued, cannot hand the session off", self.initiator,
                        self.peer)
            self.close()
            return
        state = handoff.capture(conn, b"".join(bytes(b) for b in out))
        transport.pause_reading()
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            given = self.server.hand_off is not None and self.server.hand_off.give(dup, state)
        except Exception:  # a bug in the hand-off must cost this login, never the portal
            log.exception("handing off the session of %s from %s", state.initiator_name, self.peer)
            given = False
        finally:
            dup.close()
        if given:
            self.given = state
        else:
            # The final answer was not sent yet, so the login can still fail properly: retry later.
            transport.write(handoff.refusal(state, LoginStatus.SERVICE_UNAVAILABLE))
            self.server.hand_off_refused(self, state)
        # Our descriptor goes; the owner holds its own, so the TCP connection stays up (no FIN: close, not shutdown).
        self.closing = True
        transport.close()

    @property
    def stats(self) -> CommandStats:
        return self.server.stats

    @property
    def closing(self) -> bool:
        """The connection is going: nothing more is read, and a task that finishes now sends nothing."""
        return self.run.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self.run.closing = value

    @property
    def source(self) -> str:
        return self.peer.rpartition(":")[0] or self.peer

    def _unhold(self) -> None:
        if not self.closing and not self.write_paused and self.transport is not None:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        assert self.conn is not None
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        assert conn is not None
        try:
            conn.buffer_updated(nbytes, self.loop.time())
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("internal error on connection from %s", self.peer)
            self.close()
            return
        self.pump()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        for t in list(self.tasks.values()):
            t.cancel()
        self.server.protocols.discard(self)
        self.server.counters.connections -= 1
        if self.logged_in and self.given is None:
            self.server.session_closed(self)
        self.done.set()

    def pause_writing(self) -> None:
        # The peer is not draining Data-In: stop reading new commands until it does.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- the pump -----------------------------------------------------------------------------------------------------

    def pump(self) -> None:
        conn = self.conn
        assert conn is not None
        run = self.run
        if run.pumping:
            return  # re-entered from an event handler: the outer pump sends everything
        run.pumping = True
        try:
            run.run_events()  # SCSI tasks run there; every other event comes back to self.event
        finally:
            run.pumping = False
        out = conn.take_output()
        if conn.phase is cx.Phase.HANDED_OFF:
            self._give(out)
            return
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)
        if self.close_reason is not None:
            self.close()

    def event(self, ev: cx.Event) -> None:
        """An event of the connection other than a SCSI task (those the runner runs itself), in its order."""
        if isinstance(ev, cx.TaskManagement):
            self.server.task_management(self, ev.request)
        elif isinstance(ev, cx.LoggedIn):
            self.logged_in = True
            self.server.logged_in(self, ev.result)
        elif isinstance(ev, cx.LoginFailed):
            self.server.login_failed(self, ev)
        elif isinstance(ev, cx.LoggedOut):
            self.server.counters.logouts += 1
            log.info("logout initiator=%s addr=%s target=%s", self.initiator, self.peer, self.target_name)
        elif isinstance(ev, cx.Rejected):
            self.server.counters.rejects[ev.reason.name.lower()] += 1
        elif isinstance(ev, cx.Close):
            self.close_reason = ev.reason

    @property
    def login_result(self) -> LoginResult | None:
        return self.conn.result if self.conn is not None else None

    @property
    def initiator(self) -> str:
        r = self.conn.result if self.conn else None
        return r.initiator_name if r else (self.conn.login.initiator_name if self.conn else "")

    @property
    def target_name(self) -> str:
        r = self.conn.result if self.conn else None
        if r is not None and r.target is not None:
            return r.target.name
        return "(discovery)" if r is not None else ""

    def close(self) -> None:
        if self.given is not None:
            # A session served elsewhere: its owner ends it and reports back (Server.remote_session_closed).
            if self.server.hand_off is not None:
                self.server.hand_off.end(self.given)
            return
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _tick(self) -> None:
        if self.closing or self.conn is None:
            return
        self.conn.tick(self.loop.time())
        self.pump()
        if not self.closing:
            self.timer = self.loop.call_later(TICK_S, self._tick)

    # -- SCSI tasks ---------------------------------------------------------------------------------------------------

    def spawn(self, tag: int, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        # The runner ran the command inline until it first had to wait. A page-cache read or write completes right
        # there, so every response to the commands of one receive leaves in one vectored write, and no asyncio Task
        # (several microseconds each) is made. Only a command that really waits (fsync, a thread, a lock) gets here.
        self.tasks[tag] = self.loop.create_task(_finish(coro, yielded))

    def abort(self, tag: int) -> bool:
        assert self.conn is not None
        found = self.conn.abort(tag)
        t = self.tasks.pop(tag, None)
        if t is not None:
            t.cancel()
            found = True
        return found

    def abort_lun(self, lun: int | None) -> int:
        assert self.conn is not None
        tags = self.conn.tags_for(lun)
        for tag in tags:
            self.abort(tag)
        return len(tags)

    async def drain(self) -> None:
        """Wait for every running SCSI task to finish (shutdown)."""
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)


class _Resume:
    """Awaitable that carries on a coroutine already started by hand: it hands the object the coroutine yielded
    to the driving Task, then forwards every send and throw, exactly as ``yield from`` would."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, None]:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                value = yield yielded
            except BaseException as exc:  # noqa: BLE001 - forwarded as-is, CancelledError included (an abort)
                try:
                    yielded = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    yielded = coro.send(value)
                except StopIteration:
                    return


async def _finish(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    await _Resume(coro, yielded)


class Server:
    """All portals, all connections and the session table of one daemon."""

    def __init__(self, directory: Directory, settings: PortalSettings | None = None, *,
                 hand_off: HandOff | None = None) -> None:
        self.directory = directory
        self.settings = settings or PortalSettings()
        self.hand_off = hand_off  # set: this portal logs in, and another process serves each normal session
        # A worker's: told of each adopted session that ends, so the portal that gave it forgets it.
        self.on_session_closed: Callable[[SessionState], None] | None = None
        self.protocols: set[IscsiProtocol] = set()
        self.sessions: SessionTable[IscsiProtocol] = SessionTable(self.settings.max_sessions)
        self.servers: list[asyncio.base_events.Server] = []
        self.counters = Counters()
        self.throttle = LoginThrottle()
        self.stats = CommandStats()

    def target_limits(self) -> dict[str, str]:
        s = self.settings
        return {
            "MaxRecvDataSegmentLength": str(s.max_recv_data_segment_length),
            "MaxBurstLength": str(s.max_burst_length),
            "FirstBurstLength": str(s.first_burst_length),
        }

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: IscsiProtocol(self), host, port, reuse_address=True, backlog=256)
        self.servers.append(srv)
        addr = srv.sockets[0].getsockname()
        return addr[0], addr[1]

    async def adopt(self, sock: socket.socket, state: SessionState) -> None:
        """Serve a session another process logged in, on its connected socket (which this portal now owns)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        await loop.connect_accepted_socket(lambda: IscsiProtocol(self, state), sock)

    # -- sessions -----------------------------------------------------------------------------------------------------

    def logged_in(self, proto: IscsiProtocol, result: LoginResult) -> None:
        for old in self.sessions.register(proto, result, proto.loop.time()):
            old.abort_lun(None)
            old.close()
        if proto.adopted is not None:  # counted and logged where the login ran
            log.debug("adopted session tsih=%d of %s from %s", result.tsih, result.initiator_name, proto.peer)
            return
        self.counters.logins += 1
        log.info("login initiator=%s addr=%s target=%s tsih=%d auth=%s type=%s", result.initiator_name, proto.peer,
                 result.target.name if result.target else "(discovery)", result.tsih, result.auth,
                 "discovery" if result.discovery else "normal")

    def hand_off_refused(self, proto: IscsiProtocol, state: SessionState) -> None:
        """A login that succeeded here was answered SERVICE_UNAVAILABLE instead: its target's process is not up."""
        self.counters.logins -= 1
        self.counters.login_failures[LoginStatus.SERVICE_UNAVAILABLE.name.lower()] += 1
        log.warning("login failed initiator=%s addr=%s target=%s status=%s reason=%s", state.initiator_name,
                    proto.peer, state.target_name, LoginStatus.SERVICE_UNAVAILABLE.name,
                    "the process serving the target is not up")

    def login_failed(self, proto: IscsiProtocol, ev: cx.LoginFailed) -> None:
        self.counters.login_failures[ev.status.name.lower()] += 1
        self.throttle.record_failure(proto.source, proto.loop.time())
        log.warning("login failed initiator=%s addr=%s target=%s status=%s reason=%s", ev.initiator or "?",
                    proto.peer, ev.target or "?", ev.status.name, ev.reason)

    def session_closed(self, proto: IscsiProtocol) -> None:
        conn = proto.conn
        r = conn.result if conn else None
        if (r is not None and self.sessions.remove(r.tsih, proto) and proto.adopted is not None
                and self.on_session_closed is not None):
            self.on_session_closed(proto.adopted)
        # The I_T nexus is gone: RESERVE/RELEASE reservations and PREVENT it held end with it (SPC-2 §5.5.1).
        if conn is not None and conn.scsi is not None and conn.nexus is not None:
            conn.scsi.nexus_lost(conn.nexus)

    def force_logout(self, tsih: int) -> bool:
        """End session ``tsih`` now (the management API's logout): abort its tasks and close the connection. The
        initiator sees the connection drop and may log in again, subject to the current ACL and CHAP."""
        proto = self.sessions.get(tsih)
        if proto is None:
            return False
        proto.abort_lun(None)
        proto.close()
        self.sessions.remove(tsih, proto)
        return True

    def remote_session_closed(self, tsih: int, isid: int) -> bool:
        """The owner of a session this portal gave away reports it ended: forget it (its TSIH is free again)."""
        proto = self.sessions.get(tsih)
        if proto is None or proto.given is None or proto.given.isid != isid:
            return False
        return self.sessions.remove(tsih, proto)

    def remote_sessions_lost(self, which: Callable[[SessionState], bool]) -> int:
        """The process serving some given sessions died: forget every one for which ``which(state)`` holds."""
        lost = [(tsih, p) for tsih, p in self.sessions.items() if p.given is not None and which(p.given)]
        for tsih, p in lost:
            self.sessions.remove(tsih, p)
        return len(lost)

    # -- task management (RFC 7143 §11.5) -----------------------------------------------------------------------------

    def task_management(self, proto: IscsiProtocol, req: TaskMgmtRequest) -> None:
        conn = proto.conn
        assert conn is not None
        outcome = self.sessions.task_management(proto, req, target=conn.scsi, nexus=conn.nexus,
                                                exp_cmd_sn=conn.exp_cmd_sn)
        # A LU that other gateways serve too has told them of a reset; answer once their nexuses have its unit
        # attention, so that the initiator's next command down another path sees it (SAM-5 §6.3.3).
        waits = conn.scsi.take_peer_waits() if conn.scsi is not None else []
        if waits:
            proto.loop.create_task(self._tmf_after(proto, req, outcome, waits))
            return
        self._tmf_respond(proto, req, outcome)

    async def _tmf_after(self, proto: IscsiProtocol, req: TaskMgmtRequest, outcome: TmfOutcome[IscsiProtocol],
                         waits: list[Awaitable[None]]) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 10.0)
        except TimeoutError:
            log.warning("task management: another gateway did not confirm a reset within 10 s")
        if not proto.closing and proto.conn is not None:
            self._tmf_respond(proto, req, outcome)

    def _tmf_respond(self, proto: IscsiProtocol, req: TaskMgmtRequest, outcome: TmfOutcome[IscsiProtocol]) -> None:
        assert proto.conn is not None
        proto.conn.tmf_done(req, outcome.response)
        proto.pump()
        for p in outcome.close_after:
            p.close()

    # -- shutdown -----------------------------------------------------------------------------------------------------

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight commands finish, then close every connection."""
        for srv in self.servers:
            srv.close()
        protos = list(self.protocols)
        if protos:
            try:
                await asyncio.wait_for(asyncio.gather(*(p.drain() for p in protos)), timeout_s)
            except TimeoutError:
                log.warning("shutdown: in-flight commands did not finish within %.0f s", timeout_s)
        for p in protos:
            p.close()
        if protos:
            await asyncio.wait([asyncio.ensure_future(p.done.wait()) for p in protos], timeout=2)

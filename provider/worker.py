"""A worker process of ``lunsync serve --workers N``: one event loop serving the targets the control gave it.

The control process starts ``python -m lunsync.provider.worker`` with one end of a unix socket pair and the targets
this worker owns (:mod:`lunsync.provider.assignment`). The worker opens the catalog, builds an
:class:`~lunsync.provider.daemon.Array` restricted to those targets and every LUN mapped on them (worker 0 also holds
the unmapped LUNs), resumes their restores, and says ``ready``. It has no listening socket: sessions arrive logged in,
socket and state, over the channel (:func:`lunsync.provider.channel.serve_sessions`). It answers the control's calls:
``http`` runs a forwarded API request through this worker's own FastAPI app (:mod:`lunsync.provider.forward`),
the hold calls of a snapshot set over several workers (:mod:`lunsync.provider.cross_set`),
``snapshot-read`` reads a snapshot of one of its LUNs for another worker (:mod:`lunsync.provider.remote_snapshot`), and
the worker asks the control the same for a snapshot it does not serve; ``refresh`` re-reads the catalog for what
changed hands, ``release`` closes an unmapped LUN another worker is about to
take, ``status`` and ``metrics`` say what it serves and counts. Under ``--gateway`` it shares the rbd LUNs it serves
(their PR store, ALUA groups and lease: :mod:`lunsync.provider.shared_luns`), and ``gateway_groups`` passes on the
port groups the control's index round read. It stops when its channel closes (the control's
request, or its death), draining in-flight commands and flushing every LUN as a single daemon does.

The catalog is SQLite in WAL mode with a busy timeout, so the workers open it themselves and commit their own LUNs'
changes; the control still owns it in the sense that matters: it creates and migrates the schema before any worker
starts, holds the data dir's lock, decides placement (which process may open which LUN), and serialises every change
that moves LUNs between workers. Two processes never open the same LUN: that is the rule the catalog cannot enforce
and the control does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

from lunsync.provider import cross_recovery, remote_snapshot
from lunsync.provider.channel import Channel, ChannelClosed, report_closed_sessions, serve_sessions
from lunsync.provider.cross_set import METHODS as HOLD_METHODS
from lunsync.provider.cross_set import HoldParticipant
from lunsync.provider.forward import AsgiApp, BadForward, HttpRequest, run_asgi
from lunsync.provider.rpc import Call, Json, Message, Notice, Reply
from lunsync.provider.vss import VssError
from lunsync.snapshots.catalog import CatalogError
from lunsync.snapshots.errors import NotReady, Unreachable

log = logging.getLogger("lunsync.worker")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lunsync-worker", description="a worker of lunsync serve --workers (started by "
                                                                     "the control process, not by hand)")
    ap.add_argument("--fd", type=int, required=True, help="the control channel's descriptor")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--target", action="append", default=[], help="a target this worker serves (repeatable)")
    ap.add_argument("--holds-unmapped", action="store_true", help="serve the LUNs no target maps")
    ap.add_argument("--write-staging", type=int, default=0)
    ap.add_argument("--hooks", default=None)
    ap.add_argument("--api-max-body", type=int, default=1 << 20)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--log-format", default="text")
    ap.add_argument("--gateway", default=None, help="the gateway id of the daemon (serve --gateway)")
    ap.add_argument("--port-group", type=int, default=1)
    ap.add_argument("--gateway-pool", default="rbd")
    ap.add_argument("--lease", type=int, default=10)
    return ap.parse_args(argv)


class WorkerProcess:
    """The live pieces of one worker, and its answers to the control's calls."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.done = asyncio.Event()
        self._app: AsgiApp | None = None

    async def start(self) -> None:
        from lunsync.provider import resync_array
        from lunsync.provider.config import load_hooks
        from lunsync.provider.daemon import Array, array_registry
        from lunsync.provider.metrics import ApiCounters
        from lunsync.snapshots.catalog import Catalog
        from lunsync.target.portal import PortalSettings, Server

        a = self.args
        data_dir = os.path.abspath(a.data_dir)
        self.catalog = Catalog.open(data_dir)  # not exclusive: the control holds the data dir's lock
        p = self.catalog.get_portal()
        settings = PortalSettings(nop_interval_s=p.nop_interval_s, nop_timeout_s=p.nop_timeout_s,
                                  login_timeout_s=p.login_timeout_s, max_sessions=p.max_sessions)
        self.array = Array(data_dir, self.catalog, ceph=self.catalog.get_ceph(),
                           write_staging_bytes=a.write_staging, owned_targets={t.lower() for t in a.target},
                           holds_unmapped=a.holds_unmapped)
        self.array.remote_call = self.call_control
        gateway = None
        if a.gateway is not None:
            from lunsync.provider.shared_luns import GatewaySettings

            gateway = GatewaySettings(a.gateway, a.port_group, a.gateway_pool, a.lease)
            self.array.port_group = settings.tpgt = gateway.port_group
        await self.array.load()
        if gateway is not None:
            from lunsync.provider import shared_luns

            # This worker's shared LUNs (PR store, ALUA, lease) before any session reaches them; the control
            # registered the gateway and runs the index rounds.
            link = await shared_luns.join(self.array.ceph, gateway, register=False)
            await shared_luns.share_served(self.array, gateway, link)
        self.server = Server(self.array.directory, settings)
        self.array.server = self.server
        await resync_array.attach(self.array, load_hooks(a.hooks) if a.hooks else {})
        self.counters = ApiCounters()
        self.started = time.monotonic()
        self.registry = array_registry(self.array, self.server, self.counters)
        self.holds = HoldParticipant(lambda: self.array.snapshots)
        self.channel = Channel(socket.socket(fileno=a.fd), self.on_message, self.done.set)
        report_closed_sessions(self.server, self.channel)
        self.channel.send(Notice("ready", {"pid": os.getpid()}))
        log.info("worker %d serving %d target(s), %d LUN(s)", a.index, len(self.array.directory.targets),
                 len(self.array.luns))

    async def call_control(self, method: str, params: dict[str, Json]) -> Json:
        """Ask the control (a snapshot another worker serves: :mod:`lunsync.provider.remote_snapshot`)."""
        channel = getattr(self, "channel", None)
        if channel is None:  # still starting: the control's channel is not read yet
            raise ChannelClosed("the control channel is not open yet")
        return await channel.call(method, params)

    async def stop(self) -> None:
        from lunsync.provider import resync_array

        await self.holds.lost()  # the control is gone: no commit or record news can come
        await self.server.stop()
        await resync_array.detach(self.array)
        await self.array.close()
        self.catalog.close()

    def on_message(self, msg: Message, sock: socket.socket | None) -> None:
        if serve_sessions(self.server, self.channel, msg, sock):
            return
        if isinstance(msg, Call):
            task = asyncio.get_running_loop().create_task(self._answer(msg))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _answer(self, call: Call) -> None:
        try:
            result = await self.handle(call.method, call.params)
        except BadForward as e:
            self.channel.send(Reply(call.id, error=str(e), status=500))
            return
        except NotReady as e:  # a LUN closing or moving, a snapshot's origin not open (yet): the caller retries
            self.channel.send(Reply(call.id, error=str(e), status=503))
            return
        except VssError as e:  # a part of a recovery set across workers refused: its status, as the API's
            self.channel.send(Reply(call.id, error=e.message, status=e.code.http_status))
            return
        except CatalogError as e:  # a hold call refused (the control says which worker and why)
            from lunsync.provider.api import _status_of

            self.channel.send(Reply(call.id, error=str(e), status=_status_of(e)))
            return
        except Exception as e:  # the control's call fails with the reason; the worker serves on
            log.exception("worker: call %s failed", call.method)
            self.channel.send(Reply(call.id, error=f"{type(e).__name__}: {e}", status=500))
            return
        self.channel.send(Reply(call.id, result))

    def api_app(self) -> AsgiApp:
        """The API application answering the requests the control forwards, built at the first: building it
        (FastAPI's import and its routes' models) costs more CPU than the rest of a worker's start, and a daemon
        started with one worker per core pays it per worker, though most workers never get a request."""
        if self._app is None:
            from lunsync.provider.api import ApiContext, body_limit, create_app

            ctx = ApiContext(self.array, self.server, "", self.counters, started=self.started,
                             max_body_bytes=self.args.api_max_body)
            self._app = body_limit(create_app(ctx), self.args.api_max_body)
        return self._app

    async def handle(self, method: str, params: dict[str, Json]) -> Json:
        array = self.array
        if method == "http":
            return (await run_asgi(self.api_app(), HttpRequest.from_params(params))).to_result()
        if method in HOLD_METHODS:
            return await self.holds.call(method, params)
        if method in cross_recovery.METHODS:
            return await cross_recovery.serve(array.recovery, method, params)
        if method == remote_snapshot.METHOD:
            if array.snapshots is None:
                raise Unreachable("snapshots are not open yet")
            return await remote_snapshot.serve_read(array.snapshots, params)
        if method == "refresh":
            # What changed hands: close LUNs that are no longer ours (open=False, first on every worker), then open
            # what is ours now (open=True).
            targets = params.get("targets")
            if isinstance(targets, list):
                array.owned_targets = {str(t).lower() for t in targets}
            if params.get("open") is False:
                for name in [n for n in array.luns if not array.serves_lun(n)]:
                    await array.release_lun(array.luns.pop(name))
                    log.info("lun %s: another worker serves it now", name)
            else:
                await array.reconcile()
            return {"luns": sorted(array.luns)}
        if method == "release":
            name = str(params.get("lun"))
            rs = array.recovery.restoring(name) if array.recovery is not None else None
            if rs is not None:
                return {"refused": f"lun {name!r} is being restored by recovery {rs.id} on worker {self.args.index} "
                                   "and cannot move to another worker until it finishes"}
            live = array.luns.pop(name, None)
            if live is not None:
                await array.release_lun(live)
                log.info("lun %s: handed over to another worker", name)
            return {"released": live is not None}
        if method == "status":
            return {"pid": os.getpid(), "luns": sorted(array.luns), "sessions": len(self.server.sessions),
                    "connections": self.server.counters.connections,
                    "attention": array.snapshots.attention() if array.snapshots is not None else [],
                    "restoring": {n: rs.id for n in array.luns
                                  if array.recovery is not None and (rs := array.recovery.restoring(n)) is not None}}
        if method == "gateway_groups":
            groups = params.get("groups")
            if array.gateways is not None and isinstance(groups, dict):
                array.gateways.set_groups({str(k): int(str(v)) for k, v in groups.items()})
            return None
        if method == "metrics":
            from prometheus_client import generate_latest

            return generate_latest(self.registry).decode()
        raise BadForward(f"unknown call {method!r}")


async def main(args: argparse.Namespace) -> int:
    # The control asks a worker to stop by closing its channel; a Ctrl-C or a SIGTERM to the whole process group
    # is the control's to act on, or a worker would exit before the control knows it is stopping, and be restarted.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: None)
    w = WorkerProcess(args)
    await w.start()
    await w.done.wait()
    log.info("worker %d: the control closed the channel; stopping", args.index)
    await w.stop()
    return 0


def run(argv: list[str]) -> int:
    from lunsync.provider import logs
    from lunsync.provider.daemon import SWITCH_INTERVAL_S, keep_io_buffers_on_the_heap

    args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    # The workers and the control write to the same stderr (the journal): say which worker each line is from.
    tag = f"@worker{args.index}"

    def tagged(record: logging.LogRecord) -> bool:
        if not record.name.endswith(tag):
            record.name += tag
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(tagged)
    keep_io_buffers_on_the_heap()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        import uvloop

        return uvloop.run(main(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

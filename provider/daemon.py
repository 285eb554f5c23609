"""The daemon: wires the catalog, the storage engine, the SCSI targets and the iSCSI portals together.

``lunsync serve`` lands in :func:`run`. The catalog in the data dir is the source of truth; ``--config`` applies a TOML
file to it and ``--demo`` makes sure the demo target exists. :class:`Array` holds the live objects built from the
catalog (backends, logical units, targets) and is what the management API mutates. SIGTERM stops accepting, lets
in-flight commands finish, flushes every LUN and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from lunsync.snapshots.backend import FileBackend, open_backend
from lunsync.snapshots.catalog import Catalog, lun_identity
from lunsync.snapshots.device import BlockDevice
from lunsync.target.directory import ChapCredentials, Directory, PortalAddress, TargetEntry
from lunsync.target.portal import PortalSettings, Server
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.target import ScsiTarget

log = logging.getLogger("lunsync.daemon")

DEMO_IQN = "iqn.2026-11.io.lunsync:demo"
DEMO_LUN = "demo0"
DEFAULT_LISTEN = "127.0.0.1:3260"


def parse_hostport(text: str, default_port: int = 3260) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST``. Raises ValueError with the offending text."""
    t = text.strip()
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_s = rest[1:]
    elif t.count(":") == 1:
        host, port_s = t.split(":")
    elif ":" in t:
        return t, default_port  # bare IPv6
    else:
        return t, default_port
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host or "0.0.0.0", port


@dataclass
class LiveLun:
    name: str
    device: BlockDevice
    lu: LogicalUnit


@dataclass
class Array:
    """The live array: every object the catalog describes, opened and ready."""

    data_dir: str
    catalog: Catalog
    directory: Directory = field(default_factory=Directory)
    luns: dict[str, LiveLun] = field(default_factory=dict)

    async def load(self) -> None:
        for rec in self.catalog.list_luns():
            await self.open_lun(rec.name)
        for t in self.catalog.list_targets():
            self.build_target(t.iqn)

    async def open_lun(self, name: str) -> LiveLun:
        rec = self.catalog.get_lun(name)
        path = self.catalog.lun_path(rec)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            FileBackend.create(path, rec.size_bytes, block_size=rec.block_size, thin=rec.thin,
                               read_only=False)
        device = open_backend(path, block_size=rec.block_size, thin=rec.thin, read_only=rec.read_only)
        pr_dir = os.path.join(self.data_dir, "pr")
        os.makedirs(pr_dir, mode=0o700, exist_ok=True)
        lu = LogicalUnit(device, lun_identity(rec), aptpl_path=os.path.join(pr_dir, f"{rec.name}.json"), name=name)
        live = LiveLun(name, device, lu)
        self.luns[name] = live
        return live

    def build_target(self, iqn: str) -> TargetEntry:
        t = self.catalog.get_target(iqn)
        existing = self.directory.lookup(iqn)
        scsi = existing.scsi if existing is not None else ScsiTarget(t.iqn)
        wanted = {m.lun: m.name for m in self.catalog.list_mappings(iqn)}
        for n in list(scsi.luns):
            if n not in wanted or scsi.luns[n] is not self.luns[wanted[n]].lu:
                scsi.remove_lun(n)
        for n, name in wanted.items():
            if n not in scsi.luns:
                scsi.add_lun(n, self.luns[name].lu)
        chap_rec = self.catalog.get_chap(iqn)
        chap = None
        if chap_rec is not None:
            chap = ChapCredentials(chap_rec.user, chap_rec.secret, chap_rec.mutual_user, chap_rec.mutual_secret)
        entry = TargetEntry(t.iqn, scsi, alias=t.alias or "", acl=frozenset(a.lower() for a in
                                                                              self.catalog.list_acls(iqn)), chap=chap)
        self.directory.add(entry)
        return entry

    async def close(self) -> None:
        for live in self.luns.values():
            try:
                await live.device.close()
            except Exception:
                log.exception("closing LUN %s", live.name)


def ensure_demo(catalog: Catalog, size_bytes: int) -> None:
    """Create the demo target and its LUN 0 when missing; leave them alone when present."""
    names = {lun.name for lun in catalog.list_luns()}
    if DEMO_LUN not in names:
        catalog.create_lun(DEMO_LUN, size_bytes=size_bytes, block_size=512, thin=True)
    if DEMO_IQN not in {t.iqn for t in catalog.list_targets()}:
        catalog.create_target(DEMO_IQN, alias="demo")
    if not any(m.name == DEMO_LUN for m in catalog.list_mappings(DEMO_IQN)):
        catalog.map_lun(DEMO_IQN, DEMO_LUN, 0)


def attach_text(host: str, port: int, iqn: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return "\n".join([
        f"  iSCSI URL : iscsi://{shown}:{port}/{iqn}/0",
        "  Linux     : iscsiadm -m discovery -t sendtargets -p " + f"{shown}:{port}",
        f"              iscsiadm -m node -T {iqn} -p {shown}:{port} --login",
        f"  Windows   : New-IscsiTargetPortal -TargetPortalAddress {host} -TargetPortalPortNumber {port}",
        f"              Connect-IscsiTarget -NodeAddress {iqn} -IsPersistent $true",
        f"              (or: iscsicli QAddTargetPortal {host} {port}  then  iscsicli QLoginTarget {iqn})",
    ])


@dataclass
class ServeOptions:
    data_dir: str = "./lunsync-data"
    listen: list[str] = field(default_factory=list)
    config: str | None = None
    demo: bool = False
    demo_size: int = 1 << 30


async def serve(opts: ServeOptions, ready: asyncio.Event | None = None) -> int:
    data_dir = os.path.abspath(opts.data_dir)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    catalog = Catalog.open(data_dir)
    settings = PortalSettings()
    listen = list(opts.listen)
    if opts.config:
        from lunsync.provider.config import load_config

        cfg = load_config(opts.config)
        plan = catalog.apply(cfg)
        for step in plan.steps:
            log.info("config: %s", step)
        p = cfg.portal
        settings.nop_interval_s = p.nop_interval_s
        settings.nop_timeout_s = p.nop_timeout_s
        settings.login_timeout_s = p.login_timeout_s
        settings.max_sessions = p.max_sessions
        if not listen:
            listen = list(p.listen)
    if opts.demo:
        ensure_demo(catalog, opts.demo_size)
    if not listen:
        listen = [DEFAULT_LISTEN]
    array = Array(data_dir, catalog)
    await array.load()
    server = Server(array.directory, settings)
    bound: list[tuple[str, int]] = []
    for spec in listen:
        host, port = parse_hostport(spec)
        h, p_ = await server.listen(host, port)
        bound.append((host, p_))
        array.directory.portals.append(PortalAddress(host, p_, 1))
        log.info("iSCSI portal listening on %s:%d", host, p_)
    if opts.demo:
        host, port = bound[0]
        print(f"lunsync: serving {DEMO_IQN} (data dir {data_dir})", flush=True)
        print(attach_text(host, port, DEMO_IQN), flush=True)
    else:
        print(f"lunsync: serving {len(array.directory.targets)} target(s) on "
              + ", ".join(f"{h}:{p}" for h, p in bound), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: draining in-flight commands")
    await server.stop()
    await array.close()
    catalog.close()
    log.info("stopped")
    return 0


def run(opts: ServeOptions) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but the daemon still runs without it
        runner = asyncio.run
    return runner(serve(opts))

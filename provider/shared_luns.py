"""The daemon side of several gateways serving the same RBD-backed LUNs (``lunsync serve --gateway ID --port-group N``).

:class:`SharedLuns`, in the process that serves the LUNs, turns each of its ``rbd`` LUNs into a shared one: its
persistent reservations move to the LUN's RADOS object (:class:`lunsync.provider.gateway.RadosPrStore`), it reports
every gateway's port group with the lease holder's active/optimized (:class:`lunsync.target.scsi.alua.AluaGroups`),
and an :class:`~lunsync.provider.gateway.OwnershipKeeper` keeps or contends for that lease. :class:`IndexSync`, where
the catalog's changes are decided, runs a round every ``sync_s``: it publishes the configuration of this gateway's
shared LUNs to ``lunsync.luns`` (image, identity, size, targets and LUN numbers), creates here the ones another
gateway published (same NAA and serial, the image opened, never created) once they are mapped on a target, and
refreshes the port-group list so a gateway that joins later is reported too. The index's mappings are every
gateway's: a map or unmap on one gateway is published, and the others make theirs the same at their next round (a
change made here since the last round wins over the index's, and is published). A LUN deleted on one gateway becomes
a tombstone in the index, and the others unmap and forget it (its image stays) at their next round. In one process
both live in the daemon (:func:`attach`); under ``serve --workers`` each worker shares the LUNs it serves and the
control runs the rounds, routing each change to the worker that serves it (per-LUN state has one owner, the
worker; the catalog's placement is the control's). A snapshot set over shared LUNs holds their writes on every
gateway, not only on the one taking it (:meth:`SharedLuns.hold_peers`, through
:class:`~lunsync.provider.gateway.PeerHolds`, one per serving process): a host whose dependent writes go down both
paths then finds them in the set in their order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lunsync.provider.gateway import GatewayLink, OwnershipKeeper, PeerHolds, RadosPrStore, connect
from lunsync.provider.lease import Lease
from lunsync.target.scsi.alua import AluaGroups
from lunsync.target.scsi.pr import PrState

if TYPE_CHECKING:
    from lunsync.provider.daemon import Array, LiveLun
    from lunsync.snapshots.catalog import Catalog, LunRecord
    from lunsync.snapshots.model import CephConfig
    from lunsync.target.scsi.lu import LogicalUnit

log = logging.getLogger("lunsync.gateway")

GATEWAY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """This daemon as one of several gateways: its id (unique among them), its ALUA target port group (also its
    TPGT and relative target port identifier; unique among them), the pool holding the shared objects, and the
    ownership lease's duration."""

    gateway_id: str
    port_group: int
    pool: str = "rbd"
    lease_s: int = 10
    sync_s: float = 2.0

    def __post_init__(self) -> None:
        if not GATEWAY_ID.fullmatch(self.gateway_id):
            raise ValueError(f"gateway id {self.gateway_id!r}: use 1-64 of A-Z a-z 0-9 . _ - (a letter or digit first)")
        if not 1 <= self.port_group <= 0xFFFF:
            raise ValueError(f"port group {self.port_group}: must be 1..65535")
        if not 2 <= self.lease_s <= 300:
            raise ValueError(f"lease {self.lease_s} s: must be 2..300")


def _targets(doc: dict[str, Any]) -> list[tuple[str, int]]:
    return sorted((str(m["iqn"]), int(m["lun"])) for m in doc.get("targets", []))


@dataclass
class _Shared:
    store: RadosPrStore
    keeper: OwnershipKeeper
    task: asyncio.Task[None]


@dataclass
class SharedLuns:
    """The shared LUNs of the process that serves them: each one's PR store, ALUA groups and lease (under ``serve
    --workers`` each worker has its own, over the LUNs it serves)."""

    array: Array
    settings: GatewaySettings
    link: GatewayLink
    groups: dict[str, int] = field(default_factory=dict)  # gateway id -> port group
    shared: dict[str, _Shared] = field(default_factory=dict)
    index: IndexSync | None = None  # the index rounds, when they run in this process (one process serving)
    holds: PeerHolds | None = None
    # The notifies of a set's hold sit on its critical path: a thread of their own, not the default executor's
    # queue behind the LUNs' flushes.
    _hold_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="gateway-hold"))

    def _port_groups(self) -> dict[int, tuple[int, ...]]:
        groups: dict[int, tuple[int, ...]] = {g: (g,) for g in self.groups.values()}
        groups.setdefault(self.settings.port_group, (self.settings.port_group,))
        return groups

    async def share(self, live: LiveLun, rec: LunRecord) -> None:
        """Serve ``live`` as a shared LUN (before any initiator reaches it)."""
        if rec.name in self.shared:
            return
        loop = asyncio.get_running_loop()
        lu = live.lu
        store = RadosPrStore(self.link, rec.naa)
        doc = await asyncio.to_thread(store.open_sync)
        pr = PrState(store=store)
        pr.apply(doc)
        lu.pr = pr
        await asyncio.to_thread(store.watch_sync, lu, loop)
        lu.alua = AluaGroups(self._port_groups(), transition_time_s=self.settings.lease_s)
        keeper = OwnershipKeeper(self.link, rec.naa, lu, Lease(self.settings.gateway_id, float(self.settings.lease_s)),
                                 lambda: self.groups)
        task = loop.create_task(keeper.run(), name=f"lease {rec.name}")
        self.shared[rec.name] = _Shared(store, keeper, task)
        log.info("lun %s shared: port groups %s, lease %d s", rec.name, sorted(lu.alua.groups), self.settings.lease_s)

    async def unshare(self, name: str, *, unpublish: bool, naa: str = "") -> None:
        """Stop sharing ``name`` (its lease released at once, so another gateway, or the worker of this one that
        serves it next, owns it within a sync period); with ``unpublish`` the LUN (NAA ``naa``) was deleted: its
        index entry becomes a tombstone."""
        s = self.shared.pop(name, None)
        if s is not None:
            s.task.cancel()
            await asyncio.gather(s.task, return_exceptions=True)
            await asyncio.to_thread(s.store.close_sync)
            await asyncio.to_thread(s.keeper.close_sync)
        if unpublish:
            if self.index is not None:
                self.index.forget(name)
            await asyncio.to_thread(self.link.withdraw_lun_sync, name, naa)

    # -- write holds across gateways ---------------------------------------------------------------------------------

    def _lus_of(self, naas: Sequence[str]) -> list[LogicalUnit]:
        """This process's LUs of the shared LUNs with those NAAs."""
        wanted = set(naas)
        return [live.lu for name, s in self.shared.items() if s.keeper.naa in wanted
                and (live := self.array.luns.get(name)) is not None]

    def shares(self, name: str) -> bool:
        return name in self.shared

    async def hold_peers(self, names: Sequence[str], hold_id: str, expires_s: float) -> None:
        """Every other gateway holds new writes to the shared LUNs ``names`` (its writes to them in flight
        acknowledged) on return, until :meth:`release_peers` of ``hold_id`` or ``expires_s``. Raises
        :class:`~lunsync.provider.gateway.PeersNotHeld` when one did not hold in time; release ``hold_id``
        either way."""
        naas = [self.shared[n].keeper.naa for n in names if n in self.shared]
        if not naas or self.holds is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._hold_executor, self.holds.hold_sync, hold_id, naas, expires_s)

    def release_peers(self, hold_id: str) -> None:
        """End hold ``hold_id`` on the other gateways. Returns at once: the writes held here are released by the
        caller, and the others' as the notify reaches them (a missed one ends at its expiry)."""
        if self.holds is not None:
            asyncio.get_running_loop().run_in_executor(self._hold_executor, self.holds.release_sync, hold_id)

    def set_groups(self, groups: dict[str, int]) -> None:
        """Every gateway's port group, as the last round read it: each shared LU reports them all."""
        self.groups = dict(groups)
        wanted = self._port_groups()
        for name, s in self.shared.items():
            alua = s.keeper.lu.alua
            if alua is not None and alua.set_groups(wanted):
                log.info("lun %s: port groups now %s", name, sorted(wanted))

    async def close(self) -> None:
        if self.index is not None:
            await self.index.stop()
        if self.holds is not None:
            await self.holds.close()
            await asyncio.to_thread(self.holds.close_sync)
        self._hold_executor.shutdown()
        for name in list(self.shared):
            await self.unshare(name, unpublish=False)
        await asyncio.to_thread(self.link.close)


class Members(Protocol):
    """What an index round changes, done where this gateway's LUNs and catalog are managed: the array itself in one
    process (:class:`ArrayMembers`), the control process under ``serve --workers``, which routes each change to the
    worker that serves it (:mod:`lunsync.provider.control_gateway`)."""

    @property
    def catalog(self) -> Catalog: ...

    def served(self, rec: LunRecord) -> bool:
        """Is ``rec`` (an rbd LUN) shared by this gateway, so its configuration is this gateway's to publish?"""

    async def regroup(self, groups: dict[str, int]) -> None:
        """Every shared LU reports these port groups (gateway id -> port group)."""

    async def import_lun(self, doc: dict[str, Any]) -> None:
        """Record a LUN another gateway published (its identity kept, the image never created) and, where the LUNs
        are served by this process, open it; undo the record if it cannot be served."""

    async def create_target(self, iqn: str) -> None: ...

    async def map_lun(self, iqn: str, name: str, number: int) -> None: ...

    async def unmap_lun(self, iqn: str, name: str) -> None: ...

    async def delete_lun(self, name: str) -> None: ...


@dataclass
class ArrayMembers:
    """:class:`Members` in one process: the array's own operations."""

    array: Array
    shared: SharedLuns

    @property
    def catalog(self) -> Catalog:
        return self.array.catalog

    def served(self, rec: LunRecord) -> bool:
        return rec.name in self.shared.shared

    async def regroup(self, groups: dict[str, int]) -> None:
        self.shared.set_groups(groups)

    async def import_lun(self, doc: dict[str, Any]) -> None:
        record_import(self.catalog, doc)
        try:
            await self.array.open_lun(str(doc["name"]))
        except Exception:
            self.catalog.delete_lun(str(doc["name"]))
            raise

    async def create_target(self, iqn: str) -> None:
        await self.array.create_target(iqn)

    async def map_lun(self, iqn: str, name: str, number: int) -> None:
        await self.array.map_lun(iqn, name, number)

    async def unmap_lun(self, iqn: str, name: str) -> None:
        await self.array.unmap_lun(iqn, name)

    async def delete_lun(self, name: str) -> None:
        await self.array.delete_lun(name)


def record_import(catalog: Catalog, doc: dict[str, Any]) -> None:
    """The catalog record of a LUN another gateway published, with the published identity."""
    catalog.create_lun(str(doc["name"]), int(doc["size_bytes"]), path=str(doc["path"]),
                       block_size=int(doc["block_size"]), read_only=bool(doc.get("read_only", False)), backend="rbd",
                       naa=str(doc["naa"]), serial=str(doc["serial"]))


@dataclass
class IndexSync:
    """The rounds against the cluster's index (``lunsync.luns``) and gateway list, every ``sync_s``: in the one
    process of a gateway, or in the control of a gateway split into workers (the catalog's changes are the
    control's to place)."""

    settings: GatewaySettings
    link: GatewayLink
    members: Members
    _published: dict[str, str] = field(default_factory=dict)  # what this gateway last wrote to the index, by name
    _task: asyncio.Task[None] | None = None

    def forget(self, name: str) -> None:
        """``name`` was deleted here (and its tombstone written)."""
        self._published.pop(name, None)

    def _doc(self, rec: LunRecord) -> dict[str, Any]:
        cat = self.members.catalog
        maps = [{"iqn": t.iqn, "lun": m.lun} for t in cat.list_targets() for m in cat.list_mappings(t.iqn)
                if m.name == rec.name]
        return {"name": rec.name, "path": rec.path, "size_bytes": rec.size_bytes, "block_size": rec.block_size,
                "naa": rec.naa, "serial": rec.serial, "read_only": rec.read_only, "targets": maps}

    async def _import(self, doc: dict[str, Any]) -> None:
        """Create a LUN another gateway published: its record with the published identity, its image opened (never
        created), its targets and LUN numbers."""
        members, cat = self.members, self.members.catalog
        name = str(doc["name"])
        await members.import_lun(doc)
        known = {t.iqn for t in cat.list_targets()}
        for m in doc.get("targets", []):
            iqn, number = str(m["iqn"]), int(m["lun"])
            try:
                if iqn not in known:
                    await members.create_target(iqn)
                    known.add(iqn)
                if not any(x.name == name for x in cat.list_mappings(iqn)):
                    await members.map_lun(iqn, name, number)
            except Exception as e:  # noqa: BLE001 - the LUN is served; only this target's mapping is missing
                log.warning("lun %s: cannot show it as LUN %d of %s here as on the other gateways: %s", name,
                            number, iqn, e)
        log.info("lun %s imported from the cluster (image %s, naa %s)", name, doc["path"], doc["naa"])

    async def _follow(self, name: str, entry: dict[str, Any]) -> None:
        """Make this gateway's mappings of ``name`` the index's: unmap what another gateway unmapped, map what it
        mapped."""
        members, cat = self.members, self.members.catalog
        want = set(_targets(entry))
        have = {(t.iqn, m.lun) for t in cat.list_targets() for m in cat.list_mappings(t.iqn) if m.name == name}
        for iqn, number in sorted(have - want):
            await members.unmap_lun(iqn, name)
            log.info("lun %s: unmapped from %s (LUN %d) here too, as on another gateway", name, iqn, number)
        known = {t.iqn for t in cat.list_targets()}
        for iqn, number in sorted(want - have):
            try:
                if iqn not in known:
                    await members.create_target(iqn)
                    known.add(iqn)
                await members.map_lun(iqn, name, number)
                log.info("lun %s: mapped on %s as LUN %d here too, as on another gateway", name, iqn, number)
            except Exception as e:  # noqa: BLE001 - that number may be another LUN's here; the rest still follows
                log.warning("lun %s: cannot show it as LUN %d of %s here as on the other gateways: %s", name,
                            number, iqn, e)

    async def _withdraw(self, name: str) -> None:
        """``name`` was deleted on another gateway: unmap it everywhere here and forget it (its image stays)."""
        members, cat = self.members, self.members.catalog
        try:
            for t in cat.list_targets():
                if any(m.name == name for m in cat.list_mappings(t.iqn)):
                    await members.unmap_lun(t.iqn, name)
            await members.delete_lun(name)
        except Exception as e:  # noqa: BLE001 - snapshots or a restore keep it here; it is no longer mapped, at least
            log.warning("lun %s was deleted on another gateway; unmapped here, but kept: %s", name, e)
            return
        log.info("lun %s was deleted on another gateway: unmapped and forgotten here (its image stays)", name)

    async def sync(self) -> None:
        """One round: refresh the port groups, follow the index (mappings changed and LUNs deleted on other
        gateways), publish what changed here, import what is new elsewhere."""
        await self.members.regroup(await asyncio.to_thread(self.link.port_groups_sync))
        cat = self.members.catalog
        index = await asyncio.to_thread(self.link.luns_sync)
        for rec in cat.list_luns():
            if rec.backend != "rbd" or not self.members.served(rec):
                continue
            entry, seen = index.get(rec.name), self._published.get(rec.name)
            if entry is not None and entry.get("naa") != rec.naa:
                if not entry.get("deleted"):
                    log.warning("lun %s: the cluster's index has another LUN of that name (naa %s); not shared",
                                rec.name, entry.get("naa"))
                    continue
                entry = None  # a tombstone of an earlier LUN of that name: this one is new
            elif (entry is not None and entry.get("deleted")) or (entry is None and seen is not None):
                await self._withdraw(rec.name)  # a tombstone, or gone from the index tombstone and all: deleted
                continue
            doc = self._doc(rec)
            if (entry is not None and (seen is None or _targets(json.loads(seen)) == _targets(doc))
                    and _targets(entry) != _targets(doc)):
                # No change here since the last round (or this is the first round since the start, and the index may
                # have moved on meanwhile): the index's mappings are the newer.
                await self._follow(rec.name, entry)
                self._published[rec.name] = json.dumps(self._doc(rec), sort_keys=True)
                continue
            text = json.dumps(doc, sort_keys=True)
            if seen != text or entry is None:
                await asyncio.to_thread(self.link.publish_lun_sync, rec.name, doc)
                self._published[rec.name] = text
        local = {r.name for r in cat.list_luns()}
        for name, doc in index.items():
            if name in local or doc.get("deleted") or not doc.get("targets"):
                continue  # not before it is mapped: `lun create` then `lun map` on one gateway are one import here
            try:
                await self._import(doc)
            except Exception as e:  # noqa: BLE001 - one bad entry (an image gone, a name clash) must not stop the rest
                log.warning("lun %s in the cluster index: cannot serve it here: %s", name, e)
                continue
            self._published[name] = json.dumps(doc, sort_keys=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sync_s)
            try:
                await self.sync()
            except Exception:  # the cluster unreachable for a while: keep serving, try again next round
                log.warning("gateway sync failed", exc_info=True)

    async def start(self) -> None:
        """The first round now (before any initiator: the other gateways' LUNs are served from the start), then one
        every ``sync_s``."""
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


async def join(ceph: CephConfig, settings: GatewaySettings, *, register: bool) -> GatewayLink:
    """Connect to the cluster as this gateway (``register``: and record it with its port group)."""
    try:
        handle = await asyncio.to_thread(connect, ceph.conf_path, ceph.keyring, ceph.client, ceph.connect_timeout_s)
        link = GatewayLink(handle, settings.pool, settings.gateway_id, settings.port_group)
        if register:
            await asyncio.to_thread(link.register_sync)
    except Exception as e:  # noqa: BLE001 - librados raises its own family; without the cluster there is no gateway
        raise OSError(f"gateway {settings.gateway_id}: cannot join through the cluster ({ceph.conf_path} as "
                      f"{ceph.client}, pool {settings.pool}): {e}") from None
    if register:
        groups = await asyncio.to_thread(link.port_groups_sync)
        clash = [gw for gw, g in groups.items() if g == settings.port_group and gw != settings.gateway_id]
        if clash:
            log.warning("port group %d is also registered by gateway %s: give each gateway its own",
                        settings.port_group, ", ".join(clash))
    return link


async def share_served(array: Array, settings: GatewaySettings, link: GatewayLink) -> SharedLuns:
    """Share every ``rbd`` LUN ``array`` serves (and, through :meth:`Array.open_lun`, every one it opens later)."""
    shared = SharedLuns(array, settings, link)
    shared.groups = await asyncio.to_thread(link.port_groups_sync)
    holds = PeerHolds(link, shared._lus_of, settings.lease_s)
    await asyncio.to_thread(holds.open_sync, asyncio.get_running_loop())
    shared.holds = holds
    array.gateways = shared
    for rec in array.catalog.list_luns():
        if rec.backend == "rbd" and rec.name in array.luns:
            await shared.share(array.luns[rec.name], rec)
    return shared


async def attach(array: Array, settings: GatewaySettings) -> SharedLuns:
    """Join the gateways as one process: register, share every local ``rbd`` LUN, import the others' LUNs, then
    keep in sync."""
    link = await join(array.ceph, settings, register=True)
    shared = await share_served(array, settings, link)
    shared.index = IndexSync(settings, link, ArrayMembers(array, shared))
    await shared.index.start()
    log.info("gateway %s (port group %d) joined: gateways %s", settings.gateway_id, settings.port_group,
             ", ".join(f"{gw}={g}" for gw, g in sorted(shared.groups.items())))
    return shared

"""The daemon side of several gateways serving the same RBD-backed LUNs (``lunsync serve --gateway ID --port-group N``).

:class:`SharedLuns` turns each of this daemon's ``rbd`` LUNs into a shared one: its persistent reservations move to
the LUN's RADOS object (:class:`lunsync.provider.gateway.RadosPrStore`), it reports every gateway's port group with the
lease holder's active/optimized (:class:`lunsync.target.scsi.alua.AluaGroups`), and an
:class:`~lunsync.provider.gateway.OwnershipKeeper` keeps or contends for that lease. A sync task, every
``sync_s``, publishes the configuration of this gateway's shared LUNs to ``lunsync.luns`` (image, identity, size,
targets and LUN numbers), creates here the ones another gateway published (same NAA and serial, the image opened,
never created) once they are mapped on a target, and refreshes the port-group list so a gateway that joins later is
reported too. From then on each gateway's mappings are its own. A LUN deleted here leaves the index; the other
gateways keep serving it until they delete it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lunsync.provider.gateway import GatewayLink, OwnershipKeeper, RadosPrStore, connect
from lunsync.provider.lease import Lease
from lunsync.target.scsi.alua import AluaGroups
from lunsync.target.scsi.pr import PrState

if TYPE_CHECKING:
    from lunsync.provider.daemon import Array, LiveLun
    from lunsync.snapshots.catalog import LunRecord

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


@dataclass
class _Shared:
    store: RadosPrStore
    keeper: OwnershipKeeper
    task: asyncio.Task[None]


@dataclass
class SharedLuns:
    array: Array
    settings: GatewaySettings
    link: GatewayLink
    groups: dict[str, int] = field(default_factory=dict)  # gateway id -> port group
    shared: dict[str, _Shared] = field(default_factory=dict)
    _published: dict[str, str] = field(default_factory=dict)  # what this gateway last wrote to the index, by name
    _task: asyncio.Task[None] | None = None

    # -- one LUN ----------------------------------------------------------------------------------------------------

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

    async def unshare(self, name: str, *, unpublish: bool) -> None:
        """Stop sharing ``name`` (its lease released at once, so another gateway owns it within a sync period)."""
        s = self.shared.pop(name, None)
        if s is not None:
            s.task.cancel()
            await asyncio.gather(s.task, return_exceptions=True)
            await asyncio.to_thread(s.store.close_sync)
            await asyncio.to_thread(s.keeper.close_sync)
        if unpublish:
            self._published.pop(name, None)
            await asyncio.to_thread(self.link.unpublish_lun_sync, name)

    # -- the index --------------------------------------------------------------------------------------------------

    def _doc(self, rec: LunRecord) -> dict[str, Any]:
        cat = self.array.catalog
        maps = [{"iqn": t.iqn, "lun": m.lun} for t in cat.list_targets() for m in cat.list_mappings(t.iqn)
                if m.name == rec.name]
        return {"name": rec.name, "path": rec.path, "size_bytes": rec.size_bytes, "block_size": rec.block_size,
                "naa": rec.naa, "serial": rec.serial, "read_only": rec.read_only, "targets": maps}

    async def _import(self, doc: dict[str, Any]) -> None:
        """Create a LUN another gateway published: its record with the published identity, its image opened (never
        created), its targets and LUN numbers."""
        array, cat = self.array, self.array.catalog
        name = str(doc["name"])
        cat.create_lun(name, int(doc["size_bytes"]), path=str(doc["path"]), block_size=int(doc["block_size"]),
                       read_only=bool(doc.get("read_only", False)), backend="rbd", naa=str(doc["naa"]),
                       serial=str(doc["serial"]))
        try:
            await array.open_lun(name)
        except Exception:
            cat.delete_lun(name)
            raise
        known = {t.iqn for t in cat.list_targets()}
        for m in doc.get("targets", []):
            iqn, number = str(m["iqn"]), int(m["lun"])
            if iqn not in known:
                await array.create_target(iqn)
                known.add(iqn)
            if not any(x.name == name for x in cat.list_mappings(iqn)):
                try:
                    await array.map_lun(iqn, name, number)
                except Exception as e:  # noqa: BLE001 - the LUN is served; only this target's mapping is missing
                    log.warning("lun %s: cannot show it as LUN %d of %s here as on the other gateways: %s", name,
                                number, iqn, e)
        log.info("lun %s imported from the cluster (image %s, naa %s)", name, doc["path"], doc["naa"])

    async def sync(self) -> None:
        """One round: refresh the port groups, publish what changed here, import what is new elsewhere."""
        self.groups = await asyncio.to_thread(self.link.port_groups_sync)
        groups = self._port_groups()
        for name, s in self.shared.items():
            alua = s.keeper.lu.alua
            if alua is not None and alua.set_groups(groups):
                log.info("lun %s: port groups now %s", name, sorted(groups))
        cat = self.array.catalog
        for rec in cat.list_luns():
            if rec.backend != "rbd" or rec.name not in self.shared:
                continue
            doc = self._doc(rec)
            text = json.dumps(doc, sort_keys=True)
            if self._published.get(rec.name) != text:
                await asyncio.to_thread(self.link.publish_lun_sync, rec.name, doc)
                self._published[rec.name] = text
        local = {r.name for r in cat.list_luns()}
        for name, doc in (await asyncio.to_thread(self.link.luns_sync)).items():
            if name in local or not doc.get("targets"):
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

    # -- lifecycle --------------------------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for name in list(self.shared):
            await self.unshare(name, unpublish=False)
        await asyncio.to_thread(self.link.close)


async def attach(array: Array, settings: GatewaySettings) -> SharedLuns:
    """Join the gateways: register, share every local ``rbd`` LUN, import the others' LUNs, then keep in sync."""
    ceph = array.ceph
    try:
        handle = await asyncio.to_thread(connect, ceph.conf_path, ceph.keyring, ceph.client, ceph.connect_timeout_s)
        link = GatewayLink(handle, settings.pool, settings.gateway_id, settings.port_group)
        await asyncio.to_thread(link.register_sync)
    except Exception as e:  # noqa: BLE001 - librados raises its own family; without the cluster there is no gateway
        raise OSError(f"gateway {settings.gateway_id}: cannot join through the cluster ({ceph.conf_path} as "
                      f"{ceph.client}, pool {settings.pool}): {e}") from None
    shared = SharedLuns(array, settings, link)
    shared.groups = await asyncio.to_thread(link.port_groups_sync)
    clash = [gw for gw, g in shared.groups.items() if g == settings.port_group and gw != settings.gateway_id]
    if clash:
        log.warning("port group %d is also registered by gateway %s: give each gateway its own",
                    settings.port_group, ", ".join(clash))
    array.gateways = shared
    for rec in array.catalog.list_luns():
        if rec.backend == "rbd" and rec.name in array.luns:
            await shared.share(array.luns[rec.name], rec)
    await shared.sync()
    shared._task = asyncio.get_running_loop().create_task(shared._run(), name="gateway sync")
    log.info("gateway %s (port group %d) joined: gateways %s", settings.gateway_id, settings.port_group,
             ", ".join(f"{gw}={g}" for gw, g in sorted(shared.groups.items())))
    return shared

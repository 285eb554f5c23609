"""A gateway split into workers (``lunsync serve --gateway ID --port-group N --workers M``): the control's part.

Per-LUN state has one owner, the worker that serves the LUN: each worker shares its own rbd LUNs (PR store, ALUA
groups, ownership lease; :func:`lunsync.provider.shared_luns.share_served`). What is the whole gateway's stays in
the control, which owns the catalog's placement: it registers the gateway with its port group, and runs the index
rounds (:class:`~lunsync.provider.shared_luns.IndexSync`) with :class:`ControlMembers`, which makes each change
the way the API makes it: a target is placed and created by its worker, a mapping goes through the control's own
checks (a LUN mapped on another worker's target in use is refused, an unmapped one moves), an unmap or a delete
goes to the LUN's worker. A LUN another gateway published is recorded by the control and opened by the worker of
its first mapping. The port groups each round reads are passed to every worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lunsync.provider import routing
from lunsync.provider.channel import ChannelClosed, RemoteError
from lunsync.provider.forward import HttpRequest
from lunsync.provider.shared_luns import GatewaySettings, IndexSync, join, record_import

if TYPE_CHECKING:
    from lunsync.provider.control import Control
    from lunsync.snapshots.catalog import Catalog, LunRecord

log = logging.getLogger("lunsync.gateway")


class ChangeRefused(Exception):
    """The control (or the worker it routed to) refused a change an index round asked for: the API's answer."""


@dataclass
class ControlMembers:
    """:class:`~lunsync.provider.shared_luns.Members` under ``serve --workers``: each change as an API request
    through the control's routing, one at a time with the API's own changes."""

    control: Control

    @property
    def catalog(self) -> Catalog:
        return self.control.catalog

    def served(self, rec: LunRecord) -> bool:
        return True  # every rbd LUN of the catalog is served by one of the workers, which shares it

    async def regroup(self, groups: dict[str, int]) -> None:
        for w in range(self.control.count):
            try:
                await self.control.call(w, "gateway_groups", {"groups": dict(groups)})
            except (ChannelClosed, RemoteError) as e:  # a restarting worker reads them from the cluster itself
                log.warning("worker %d: port groups not passed on: %s", w, e)

    async def _change(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        headers = () if body is None else (("content-type", "application/json"),)
        req = HttpRequest(method, path, "", headers, data, None)  # an ASGI path: decoded (IQNs and names have no /)
        control = self.control
        async with control.lock:
            resp = await control.decide(routing.route(req.method, req.path, req.json(), control.placement), req)
        if not resp.ok:
            raise ChangeRefused(f"{resp.status}: {resp.body.decode(errors='replace')}")

    async def import_lun(self, doc: dict[str, Any]) -> None:
        async with self.control.lock:
            record_import(self.catalog, doc)  # opened by the worker of the target it is mapped on next

    async def create_target(self, iqn: str) -> None:
        await self._change("POST", "/v1/targets", {"iqn": iqn})

    async def map_lun(self, iqn: str, name: str, number: int) -> None:
        await self._change("POST", f"/v1/targets/{iqn}/luns", {"name": name, "lun": number})

    async def unmap_lun(self, iqn: str, name: str) -> None:
        await self._change("DELETE", f"/v1/targets/{iqn}/luns/{name}")

    async def delete_lun(self, name: str) -> None:
        await self._change("DELETE", f"/v1/luns/{name}")


async def join_gateways(control: Control, settings: GatewaySettings) -> IndexSync:
    """Register the gateway (before the workers start: a cluster that cannot be reached stops the daemon here, as
    it stops one process); :meth:`IndexSync.start` once the workers are up."""
    link = await join(control.catalog.get_ceph(), settings, register=True)
    return IndexSync(settings, link, ControlMembers(control))


async def leave(index: IndexSync) -> None:
    await index.stop()
    await asyncio.to_thread(index.link.close)

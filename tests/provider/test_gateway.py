"""lunsync.provider.gateway against the real test cluster: two gateways (two RADOS clients, as two hosts would be)
sharing one LU's persistent reservations through ``lunsync.pr.<naa>`` and its ownership lease through
``lunsync.owner.<naa>``, driven through the real SCSI dispatcher of each gateway."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from ceph_cluster import POOL, CephCluster
from lunsync.provider.gateway import GatewayLink, OwnershipKeeper, PeerHolds, RadosPrStore, connect
from lunsync.provider.lease import Lease
from lunsync.target.scsi.alua import AluaGroups
from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.pr import PrState
from lunsync.target.scsi.target import ScsiTarget
from lunsync.target.scsi.task import Nexus, ScsiResponse, ScsiTask, Status

from tests.target.scsi.memdev import IDENTITY, MemDevice

pytestmark = pytest.mark.e2e

IQN = "iqn.2026-11.io.lunsync:shared"
NODE1, NODE2 = "iqn.1991-05.com.microsoft:node1", "iqn.1991-05.com.microsoft:node2"
K1, K2 = 0x1111, 0x2222
RTPG = bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])


@pytest.fixture
def links(ceph_cluster: CephCluster) -> Iterator[tuple[GatewayLink, GatewayLink]]:
    made = []
    for gw, group in (("gw-a", 1), ("gw-b", 2)):
        handle = connect(str(ceph_cluster.conf), str(ceph_cluster.keyring), "client.admin", 10)
        link = GatewayLink(handle, POOL, gw, group)
        link.register_sync()
        made.append(link)
    yield made[0], made[1]
    for link in made:
        link.close()


class Gateway:
    def __init__(self, link: GatewayLink, naa: str) -> None:
        self.link = link
        self.store = RadosPrStore(link, naa)
        self.lu = LogicalUnit(MemDevice(), IDENTITY, name="shared")
        self.lu.pr = PrState(store=self.store)
        self.lu.pr.apply(self.store.open_sync())
        groups = link.port_groups_sync()
        self.lu.alua = AluaGroups({g: (g,) for g in groups.values()})
        self.target = ScsiTarget(IQN, {0: self.lu}, port_groups={link.port_group: (link.port_group,)})
        self.tag = 0

    def nexus(self, host: str) -> Nexus:
        g = self.link.port_group
        return Nexus(host, 0x400001370000, IQN, g, g)

    async def cmd(self, host: str, cdb: bytes, data: bytes | None = None) -> ScsiResponse:
        self.tag += 1
        return await self.target.execute(ScsiTask(self.nexus(host), 0, cdb, self.tag, data_out=data, expected_in=4096))

    async def prout(self, host: str, sa: int, key: int = 0, sa_key: int = 0, rtype: int = 0) -> Status:
        params = struct.pack(">QQ4xBx2x", key, sa_key, 0)
        return (await self.cmd(host, bytes([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0]), params)).status

    async def write(self, host: str) -> ScsiResponse:
        return await self.cmd(host, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), bytes(512))


def test_pr_cycle_across_two_gateways(links: tuple[GatewayLink, GatewayLink]) -> None:
    async def run() -> None:
        naa = uuid.uuid4().hex
        a, b = Gateway(links[0], naa), Gateway(links[1], naa)
        loop = asyncio.get_running_loop()
        for g in (a, b):
            await asyncio.to_thread(g.store.watch_sync, g.lu, loop)
        for g in (a, b):  # every nexus has been seen (its POWER ON unit attention consumed)
            for host in (NODE1, NODE2):
                await g.cmd(host, bytes(6))
        # Register both nodes on both gateways, reserve Write Exclusive through A.
        for g in (a, b):
            assert await g.prout(NODE1, 0, sa_key=K1) == Status.GOOD
            assert await g.prout(NODE2, 0, sa_key=K2) == Status.GOOD
        assert await a.prout(NODE1, 1, key=K1, rtype=1) == Status.GOOD
        # B's per-command conflict check sees A's reservation: it was adopted before A's command completed.
        assert b.lu.pr.res_type == 1
        assert (await b.write(NODE2)).status == Status.RESERVATION_CONFLICT
        assert (await a.write(NODE1)).status == Status.GOOD
        keys = (await b.cmd(NODE2, bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]))).data or b""
        assert struct.unpack_from(">II", bytes(keys)) == (4, 32)  # four registrations (RESERVE does not count)
        # The other node preempts through B (the cluster's quorum arbitration); A's nexus of node 1 learns of it.
        assert await b.prout(NODE2, 4, key=K2, sa_key=K1, rtype=1) == Status.GOOD
        r = await a.write(NODE1)
        assert r.status == Status.CHECK_CONDITION and r.sense is not None and (r.sense[12], r.sense[13]) == (0x2A, 5)
        assert (await a.write(NODE1)).status == Status.RESERVATION_CONFLICT
        assert (await b.write(NODE2)).status == Status.GOOD
        # Release from B; node 1 re-registers on A and writes again.
        assert await b.prout(NODE2, 2, key=K2, rtype=1) == Status.GOOD
        assert a.lu.pr.res_type == 0
        assert await a.prout(NODE1, 0, sa_key=K1) == Status.GOOD
        assert (await a.write(NODE1)).status == Status.GOOD
        # Both gateways race for the reservation; the object version lets exactly one win.
        results = await asyncio.gather(a.prout(NODE1, 1, key=K1, rtype=1), b.prout(NODE2, 1, key=K2, rtype=1))
        assert sorted(results) == [Status.GOOD, Status.RESERVATION_CONFLICT]
        assert a.lu.pr.doc() == b.lu.pr.doc()
        for g in (a, b):
            await asyncio.to_thread(g.store.close_sync)

    asyncio.run(run())


def test_lease_moves_ownership_when_the_owner_stops(links: tuple[GatewayLink, GatewayLink]) -> None:
    async def run() -> None:
        naa = uuid.uuid4().hex
        a, b = Gateway(links[0], naa), Gateway(links[1], naa)
        groups = links[0].port_groups_sync()
        keepers = [OwnershipKeeper(g.link, naa, g.lu, Lease(g.link.gateway_id, 3.0), lambda: groups) for g in (a, b)]
        loop = asyncio.get_running_loop()
        task_a = asyncio.create_task(keepers[0].run())
        for _ in range(100):
            if a.lu.alua is not None and a.lu.alua.owner == 1:
                break
            await asyncio.sleep(0.05)
        task_b = asyncio.create_task(keepers[1].run())
        await asyncio.sleep(1.0)
        for g in (a, b):
            d = bytes((await g.cmd(NODE1, RTPG)).data or b"")  # the first command: POWER ON; then the states
            d = bytes((await g.cmd(NODE1, RTPG)).data or b"")
            assert (d[4] & 0x0F, d[16] & 0x0F) == (0, 1), f"{g.link.gateway_id}: {d.hex()}"
        # Gateway A dies: it stops renewing and never unlocks. B takes over once the OSD expires the lock.
        t0 = loop.time()
        keepers[0]._release = lambda: None  # type: ignore[method-assign]  # a dead gateway releases nothing
        task_a.cancel()
        while b.lu.alua is not None and b.lu.alua.owner != 2 and loop.time() - t0 < 10:
            await asyncio.sleep(0.05)
        took = loop.time() - t0
        assert b.lu.alua is not None and b.lu.alua.owner == 2, "B never took the lease"
        # Not before the OSD expired A's last renewal (at most a period before the stop), and within a retry period of
        # it, with slack for a loaded 2-core machine.
        assert 3.0 - 1.0 - 0.5 < took < 3.0 + 1.0 + 4.0, f"took {took:.1f} s"
        r = await b.cmd(NODE1, RTPG)
        assert r.status == Status.CHECK_CONDITION and r.sense is not None and (r.sense[12], r.sense[13]) == (0x2A, 6)
        d = bytes((await b.cmd(NODE1, RTPG)).data or b"")
        assert (d[4] & 0x0F, d[16] & 0x0F, d[16] & 0x80) == (1, 0, 0x80)
        # A clean shutdown releases at once: B gives it up, a restarted A takes it within a period.
        task_b.cancel()
        await asyncio.gather(task_b, return_exceptions=True)
        t0 = loop.time()
        task_a = asyncio.create_task(OwnershipKeeper(a.link, naa, a.lu, Lease("gw-a", 3.0), lambda: groups).run())
        while a.lu.alua is not None and a.lu.alua.owner != 1 and loop.time() - t0 < 5:
            await asyncio.sleep(0.05)
        assert a.lu.alua is not None and a.lu.alua.owner == 1 and loop.time() - t0 < 1.0
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)

    asyncio.run(run())


def _watchers(cluster: CephCluster) -> int:
    p = subprocess.run(["rados", "-c", str(cluster.conf), "-p", POOL, "-N", "lunsync", "listwatchers",
                        "lunsync.gateways"], capture_output=True, text=True, timeout=60, check=False)
    return p.stdout.count("watcher=") if p.returncode == 0 else -1


def test_peer_holds_hold_release_and_expire(links: tuple[GatewayLink, GatewayLink],
                                            ceph_cluster: CephCluster) -> None:
    """Gateway A asks B, through watch/notify on lunsync.gateways, to hold writes to a LUN B serves: B's write
    gate is held when A's call returns (a write through B waits), and opens on A's release; a hold whose release
    never comes ends at its expiry; a release that overtook its hold leaves nothing held; a LUN B does not serve is
    acknowledged at once."""
    async def run() -> None:
        naa = uuid.uuid4().hex
        b = Gateway(links[1], naa)
        loop = asyncio.get_running_loop()
        peers = [PeerHolds(links[0], lambda naas: [], 3), PeerHolds(links[1], lambda naas: [b.lu] if naa in naas
                                                                       else [], 3)]
        for p in peers:
            await asyncio.to_thread(p.open_sync, loop)
        try:
            for _ in range(80):  # the watches of gateways an earlier test killed lapse within their lease
                if await asyncio.to_thread(_watchers, ceph_cluster) == 2:
                    break
                await asyncio.sleep(0.1)
            await b.cmd(NODE1, bytes(6))  # POWER ON consumed
            a = peers[0]

            async def write_took() -> float:
                t = loop.time()
                assert (await b.write(NODE1)).status == Status.GOOD
                return loop.time() - t

            await asyncio.to_thread(a.hold_sync, "h1", [naa], 10.0)
            assert b.lu.gate.active == 1  # held on return: the taker snapshots now
            loop.call_later(0.3, lambda: loop.run_in_executor(None, a.release_sync, "h1"))
            assert await write_took() > 0.25  # it waited for the release, then landed
            assert b.lu.gate.active == 0
            await asyncio.to_thread(a.hold_sync, "h2", [naa], 0.5)  # its release never comes
            assert 0.3 < await write_took() < 3.0
            await asyncio.to_thread(a.release_sync, "h3")  # overtakes its hold
            await asyncio.to_thread(a.hold_sync, "h3", [naa], 10.0)
            assert b.lu.gate.active == 0 and await write_took() < 0.2
            await asyncio.to_thread(a.hold_sync, "h4", [uuid.uuid4().hex], 10.0)  # not served by B
            assert b.lu.gate.active == 0
        finally:
            for p in peers:
                await p.close()
                await asyncio.to_thread(p.close_sync)
            await asyncio.to_thread(b.store.close_sync)

    asyncio.run(run())

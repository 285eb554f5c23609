"""Per-name serialization: the pure lock map, and racing creates and deletes of one LUN against the real daemon.

The race is the one a careless orchestrator makes: a create and a delete of the same name in flight together, fifty
times. Either may reach the daemon first (split into workers, the control forwards each request over its own
channel), but the two must behave as if run one after the other: each round's answers are those of one of the two
orders from what the round before left (a create answers 201, or 200 when the same LUN is there already, an
idempotent retry; a delete 204 or 404), and at the end the catalog and the live array agree with what the answers
say and the daemon holds no descriptor on a deleted LUN file.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest
from api_harness import ApiDaemon
from lunsync.provider.name_locks import NameLocks


def test_one_name_runs_one_at_a_time_and_other_names_do_not_wait() -> None:
    async def main() -> list[str]:
        locks = NameLocks()
        order: list[str] = []

        async def op(tag: str, *names: str) -> None:
            async with locks.hold(*names):
                order.append(f"{tag}+")
                await asyncio.sleep(0.01)
                order.append(f"{tag}-")

        await asyncio.gather(op("a", "x"), op("b", "x"), op("c", "y"), op("d", "y", "x", "x"))
        assert locks.busy() == 0  # nothing kept once every holder left
        return order

    order = asyncio.run(main())
    # a and c start together (different names); b waits for a; d (both names) waits for everyone before it on x and y
    assert order[:2] == ["a+", "c+"]
    assert order.index("b+") > order.index("a-")
    assert order.index("d+") > max(order.index("b-"), order.index("c-"))


@pytest.mark.e2e
@pytest.mark.faults
def test_racing_create_and_delete_of_one_name_leave_catalog_and_array_agreeing(api_daemon: ApiDaemon) -> None:
    assert api_daemon.proc is not None
    headers = {"Authorization": f"Bearer {api_daemon.token}"}

    async def rounds() -> tuple[list[int], list[int]]:
        creates: list[int] = []
        deletes: list[int] = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_daemon.api_port}", headers=headers,
                                     timeout=30) as c:
            for _ in range(50):
                create = c.post("/v1/luns", json={"name": "racer", "size": "4MiB"})
                delete = c.delete("/v1/luns/racer")
                rc, rd = await asyncio.gather(create, delete)
                creates.append(rc.status_code)
                deletes.append(rd.status_code)
        return creates, deletes

    creates, deletes = asyncio.run(rounds())
    exists = False
    for n, answers in enumerate(zip(creates, deletes, strict=True)):
        # (create, delete) answers when the create ran first, and when the delete did, from what is there now.
        create_first = (200 if exists else 201, 204)
        delete_first = (201, 204 if exists else 404)
        assert answers in (create_first, delete_first), (n, exists, list(zip(creates, deletes, strict=True)))
        exists = answers == delete_first
    with api_daemon.http() as c:
        catalog = {x["name"] for x in c.get("/v1/luns").json()}
        live = c.get("/v1/status").json()["luns"]
        assert live == len(catalog), (live, catalog)
        assert ("racer" in catalog) == exists, (catalog, exists)
        if "racer" in catalog:
            assert c.delete("/v1/luns/racer").status_code == 204
    fd_dir = f"/proc/{api_daemon.proc.pid}/fd"
    stale = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.endswith(" (deleted)") and "racer" in target:
            stale.append(target)
    assert not stale, stale

"""Snapshot-set consistency through the real daemon, judged by stamps rather than timing.

Three LUNs, each with its own writer (its own iSCSI session, in its own thread). The writers take turns on one
global sequence: write ``n`` goes to LUN ``n % 3``, block ``n // 3``, and write ``n + 1`` is issued only once ``n`` is
acknowledged, so write ``n`` causally precedes ``n + 1`` across LUNs. Sets are created through the API while they
write. A set is one point in time exactly when the stamps in its three snapshots, together, are a prefix ``0..K`` of
the sequence with no gap; and ``K`` is bounded by what was acknowledged before the request and after the answer.
With ``serve --workers 2`` the same check runs on a set whose LUNs two worker processes serve.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest
from crash.stamps import Stamp, StampClient, Turns, parse
from e2e.harness import DEMO_IQN, Daemon

pytestmark = pytest.mark.e2e

LUNS = 3
SETS = 3
GAP = 60  # writes acknowledged between sets


SECOND_IQN = "iqn.2026-11.io.lunsync:setb"


def writer(d: Daemon, iqn: str, lun: int, i: int, turns: Turns) -> None:
    client = StampClient("127.0.0.1", d.port, iqn, f"iqn.2026-11.io.lunsync:setw{i}", 0x400000C00000 + i)
    turns.write_turns(client, lun, i, LUNS)


def test_every_snapshot_of_a_set_holds_a_prefix_of_one_sequence(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(api=True)
    sets_hold_a_prefix(d, [(DEMO_IQN, i + 1) for i in range(LUNS)])


def test_a_set_over_luns_of_two_workers_holds_a_prefix_of_one_sequence(
        daemon_factory: Callable[..., Daemon]) -> None:
    """serve --workers 2: s1 is on a second target, which the control places on the other worker, so every set
    spans both worker processes and is taken by the control's two-phase hold."""
    d = daemon_factory(api=True, workers=2)
    api = httpx.Client(base_url=d.api_url + "/v1", headers={"Authorization": f"Bearer {d.api_token}"}, timeout=60)
    api.post("/targets", json={"iqn": SECOND_IQN}).raise_for_status()
    sets_hold_a_prefix(d, [(DEMO_IQN, 1), (SECOND_IQN, 0), (DEMO_IQN, 2)])
    workers = api.get("/status").json()["workers"]
    assert [sorted(w["luns"]) for w in workers] == [["demo0", "s0", "s2"], ["s1"]], workers
    # The set is one set to the API: listed with its members from both workers, and deleted member by member.
    listed = [s for s in api.get("/snapshots").json() if s["set"] == "set0"]
    assert sorted(s["name"] for s in listed) == ["s0@set0", "s1@set0", "s2@set0"]
    assert len({s["created_at"] for s in listed}) == 1
    for s in listed:
        api.delete(f"/snapshots/{s['name']}").raise_for_status()
    assert not [s for s in api.get("/snapshots").json() if s["set"] == "set0"]


def sets_hold_a_prefix(d: Daemon, where: list[tuple[str, int]]) -> None:
    """LUN ``s{i}`` mapped as ``where[i]`` (target, LUN number); sets taken while the writers take turns, then each
    snapshot exposed on its LUN's target and checked."""
    api = httpx.Client(base_url=d.api_url + "/v1", headers={"Authorization": f"Bearer {d.api_token}"}, timeout=60)
    for i, (iqn, n) in enumerate(where):
        api.post("/luns", json={"name": f"s{i}", "size": "16MiB"}).raise_for_status()
        api.post(f"/targets/{iqn}/luns", json={"name": f"s{i}", "lun": n}).raise_for_status()
    turns = Turns()
    threads = [threading.Thread(target=writer, args=(d, iqn, n, i, turns), daemon=True)
               for i, (iqn, n) in enumerate(where)]
    for t in threads:
        t.start()
    bounds: list[tuple[int, int]] = []
    try:
        for k in range(SETS):
            turns.wait_acked((k + 1) * GAP + (bounds[-1][1] if bounds else 0))
            before = turns.acked
            r = api.post("/snapshots", json={"snapshots": [f"s{i}@set{k}" for i in range(LUNS)], "set": f"set{k}"})
            r.raise_for_status()
            after = turns.acked
            bounds.append((before, after))
        turns.wait_acked(bounds[-1][1] + GAP)
    finally:
        turns.finish()
        for t in threads:
            t.join(30)
    assert turns.error is None, repr(turns.error)
    total = turns.acked + 1
    readers = {iqn: StampClient("127.0.0.1", d.port, iqn, "iqn.2026-11.io.lunsync:setr", 0x400000C000FF)
               for iqn in {iqn for iqn, _ in where}}
    try:
        for k, (before, after) in enumerate(bounds):
            seen: set[int] = set()
            for i, (iqn, _) in enumerate(where):
                api.post(f"/snapshots/s{i}@set{k}/expose", json={"target": iqn, "lun": 10 + i}).raise_for_status()
                blocks = -(-total // LUNS)
                data = readers[iqn].read(10 + i, 0, blocks)
                for b in range(blocks):
                    got = parse(data[b * 4096:(b + 1) * 4096])
                    assert got != "damaged", f"set{k}: lun s{i} block {b} is damaged"
                    if got is not None:
                        assert isinstance(got, Stamp) and (got.lun, got.block) == (i, b), (k, i, b, got)
                        seen.add(got.seq)
                api.delete(f"/snapshots/s{i}@set{k}/expose").raise_for_status()
            last = max(seen)
            assert seen == set(range(last + 1)), f"set{k}: a gap in the sequence: missing " \
                f"{sorted(set(range(last + 1)) - seen)[:10]} below {last}"
            # Everything acknowledged before the request is in; nothing issued after the answer is.
            assert before <= last <= after + 1, (k, before, last, after)
    finally:
        for r in readers.values():
            r.close()
    d.assert_healthy()

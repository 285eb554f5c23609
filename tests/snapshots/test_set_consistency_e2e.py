"""Snapshot-set consistency through the real daemon, judged by stamps rather than timing.

Three LUNs, each with its own writer (its own iSCSI session, in its own thread). The writers take turns on one
global sequence: write ``n`` goes to LUN ``n % 3``, block ``n // 3``, and write ``n + 1`` is issued only once ``n`` is
acknowledged, so write ``n`` causally precedes ``n + 1`` across LUNs. Sets are created through the API while they
write. A set is one point in time exactly when the stamps in its three snapshots, together, are a prefix ``0..K`` of
the sequence with no gap; and ``K`` is bounded by what was acknowledged before the request and after the answer.
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


def writer(d: Daemon, i: int, turns: Turns) -> None:
    client = StampClient("127.0.0.1", d.port, DEMO_IQN, f"iqn.2026-11.io.lunsync:setw{i}", 0x400000C00000 + i)
    turns.write_turns(client, i + 1, i, LUNS)


def test_every_snapshot_of_a_set_holds_a_prefix_of_one_sequence(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(api=True)
    api = httpx.Client(base_url=d.api_url + "/v1", headers={"Authorization": f"Bearer {d.api_token}"}, timeout=60)
    for i in range(LUNS):
        api.post("/luns", json={"name": f"s{i}", "size": "16MiB"}).raise_for_status()
        api.post(f"/targets/{DEMO_IQN}/luns", json={"name": f"s{i}", "lun": i + 1}).raise_for_status()
    turns = Turns()
    threads = [threading.Thread(target=writer, args=(d, i, turns), daemon=True) for i in range(LUNS)]
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
    reader = StampClient("127.0.0.1", d.port, DEMO_IQN, "iqn.2026-11.io.lunsync:setr", 0x400000C000FF)
    try:
        for k, (before, after) in enumerate(bounds):
            seen: set[int] = set()
            for i in range(LUNS):
                api.post(f"/snapshots/s{i}@set{k}/expose", json={"target": DEMO_IQN, "lun": 10 + i}).raise_for_status()
                blocks = -(-total // LUNS)
                data = reader.read(10 + i, 0, blocks)
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
        reader.close()
    d.assert_healthy()

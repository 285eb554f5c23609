"""The data path's plain-integer command statistics: which opcodes count as what, bucket edges, bytes only on GOOD."""

from __future__ import annotations

import bisect
import math

import pytest
from lunsync.target.stats import LATENCY_BOUNDS_S, OP_NAMES, OP_OF_OPCODE, CommandStats, IoCounts, Op, bucket


@pytest.mark.parametrize(("opcode", "op"), [
    (0x28, Op.READ), (0x88, Op.READ), (0x08, Op.READ), (0xA8, Op.READ),
    (0x2A, Op.WRITE), (0x8A, Op.WRITE), (0x2E, Op.WRITE), (0x8E, Op.WRITE),
    (0x35, Op.FLUSH), (0x91, Op.FLUSH), (0x42, Op.UNMAP),
    (0x00, Op.OTHER), (0x12, Op.OTHER), (0x9E, Op.OTHER), (0x89, Op.OTHER),
])
def test_opcode_classes(opcode: int, op: Op) -> None:
    assert OP_OF_OPCODE[opcode] == op


def test_reads_and_writes_count_per_lun_and_per_session() -> None:
    stats = CommandStats()
    session: dict[int, IoCounts] = {}
    stats.record("db0", session, 3, 0x28, True, 4096, 0.0002)
    stats.record("db0", session, 3, 0x2A, True, 8192, 0.0003)
    stats.record("db0", session, 3, 0x2A, False, 8192, 0.0003)  # CHECK CONDITION: a command, but no bytes moved
    stats.record("db0", session, 3, 0x35, True, 0, 0.004)
    io = stats.luns["db0"].io
    assert (io.reads, io.writes, io.read_bytes, io.write_bytes) == (1, 2, 4096, 8192)
    assert session[3].as_dict() == {"reads": 1, "writes": 2, "read_bytes": 4096, "write_bytes": 8192}
    _, flushes, _ = stats.luns["db0"].histogram(Op.FLUSH)
    assert flushes == 1


def test_histogram_is_cumulative_with_prometheus_edges() -> None:
    stats = CommandStats()
    s: dict[int, IoCounts] = {}
    bound = LATENCY_BOUNDS_S[3]
    stats.record("x", s, 0, 0x28, True, 512, bound)  # exactly on a bound: in that bucket (le means <=)
    stats.record("x", s, 0, 0x28, True, 512, bound * 1.0001)
    stats.record("x", s, 0, 0x28, True, 512, 99.0)  # beyond the last bound: only +Inf
    buckets, count, total = stats.luns["x"].histogram(Op.READ)
    assert count == 3 and total == pytest.approx(bound * 2.0001 + 99.0)
    le = dict(buckets)
    assert le[bound] == 1 and le[LATENCY_BOUNDS_S[4]] == 2 and le[LATENCY_BOUNDS_S[-1]] == 2 and le[math.inf] == 3
    counts = [n for _, n in buckets]
    assert counts == sorted(counts), "cumulative counts never decrease"


def test_forget_drops_a_deleted_lun() -> None:
    stats = CommandStats()
    stats.record("gone", {}, 0, 0x28, True, 512, 0.001)
    stats.forget("gone")
    assert "gone" not in stats.luns
    assert OP_NAMES == ("read", "write", "flush", "unmap", "other")


def test_a_stall_does_not_move_the_median_baseline() -> None:
    """The resync throttle's baseline: 1000 commands of ~80 us and one stuck 20 s leave it near 80 us (the mean
    would be 20 ms, and the throttle would never back off)."""
    from lunsync.target.stats import LunStats, Op

    s = LunStats()
    assert s.median_s((int(Op.READ), int(Op.WRITE))) is None  # too few commands to say
    for _ in range(1000):
        s.observe(int(Op.READ), 0.00008)
    s.observe(int(Op.WRITE), 20.0)
    m = s.median_s((int(Op.READ), int(Op.WRITE)))
    assert m is not None and 0.00005 <= m <= 0.0001, m


def test_bucket_is_bisect_left_on_the_bounds() -> None:
    probes = [0.0, 1e-9, 2.5e-5, *LATENCY_BOUNDS_S, *(b * 1.0001 for b in LATENCY_BOUNDS_S),
              *(b * 0.9999 for b in LATENCY_BOUNDS_S), 10.0, 1e9]
    for seconds in probes:
        assert bucket(seconds) == bisect.bisect_left(LATENCY_BOUNDS_S, seconds), seconds
    assert bucket(1e9) == len(LATENCY_BOUNDS_S)  # above the last bound: the implicit +Inf bucket

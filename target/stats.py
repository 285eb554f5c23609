"""Per-LUN and per-session command statistics for the data path, kept as plain integers.

This module owns what the portal counts once per completed SCSI command: commands and bytes per LUN and direction, a
latency histogram per LUN and operation with fixed bucket bounds, and the same command and byte counts per session
and LUN number (for the session list of the management API). Nothing here calls prometheus-client:
:mod:`lunsync.provider.metrics` reads these objects at scrape time, because one prometheus-client call per PDU halved
throughput on this machine. Recording a command is a table lookup, a short scan of the bucket bounds and a few integer additions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

# Upper bounds (seconds) of the latency buckets; the last, implicit bucket is +Inf. From 50 µs (a page-cache hit on
# loopback) to 2.5 s (an fsync on a busy disk), roughly three per decade like Prometheus' defaults.
LATENCY_BOUNDS_S: Final[tuple[float, ...]] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Op(enum.IntEnum):
    """The operation label of the latency histogram: a handful of values, so label cardinality stays bounded."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    UNMAP = 3
    OTHER = 4


def bucket(seconds: float) -> int:
    """The latency bucket of ``seconds``: the first whose upper bound is not below it (``bisect_left`` on the bounds).
    A scan from the lowest bound, as compiled float comparisons: most commands land in the first few buckets, and a
    call to ``bisect`` costs more than the scan."""
    i = 0
    for bound in LATENCY_BOUNDS_S:
        if seconds <= bound:
            return i
        i += 1
    return i


OP_NAMES: Final[tuple[str, ...]] = tuple(op.name.lower() for op in Op)
_READ: Final = int(Op.READ)
_WRITE: Final = int(Op.WRITE)

_READS = (0x08, 0x28, 0xA8, 0x88)  # READ(6/10/12/16)
_WRITES = (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E)  # WRITE(6/10/12/16), WRITE AND VERIFY(10/12/16)
_FLUSHES = (0x35, 0x91)  # SYNCHRONIZE CACHE(10/16)
_UNMAPS = (0x42,)  # UNMAP


def _op_table() -> bytes:
    table = bytearray([Op.OTHER] * 256)
    for codes, op in ((_READS, Op.READ), (_WRITES, Op.WRITE), (_FLUSHES, Op.FLUSH), (_UNMAPS, Op.UNMAP)):
        for code in codes:
            table[code] = op
    return bytes(table)


# Indexed by the CDB's first byte: one bytes lookup on the hot path instead of a chain of comparisons.
OP_OF_OPCODE: Final[bytes] = _op_table()


@dataclass(slots=True)
class IoCounts:
    """Read and write commands and bytes. Bytes count only what completed with GOOD status."""

    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "read_bytes": self.read_bytes,
                "write_bytes": self.write_bytes}


def _zero_buckets() -> list[list[int]]:
    return [[0] * (len(LATENCY_BOUNDS_S) + 1) for _ in Op]


@dataclass(slots=True)
class LunStats:
    """Everything counted for one LUN (by name, so a LUN mapped into two targets is counted once)."""

    io: IoCounts = field(default_factory=IoCounts)
    # buckets[op][i] counts commands whose latency fell in (bound[i-1], bound[i]]; not cumulative, so recording
    # touches one cell. The collector accumulates at scrape time.
    buckets: list[list[int]] = field(default_factory=_zero_buckets)
    latency_sum_s: list[float] = field(default_factory=lambda: [0.0] * len(Op))

    def observe(self, op: int, seconds: float) -> None:
        self.buckets[op][bucket(seconds)] += 1
        self.latency_sum_s[op] += seconds

    def median_s(self, ops: tuple[int, ...], min_count: int = 100) -> float | None:
        """The median latency of ``ops`` together, interpolated inside its bucket; None below ``min_count``
        commands. Unlike the mean, one command stuck for seconds moves it by at most one command's rank."""
        cells = [sum(self.buckets[op][i] for op in ops) for i in range(len(LATENCY_BOUNDS_S) + 1)]
        total = sum(cells)
        if total < min_count:
            return None
        half = total / 2
        acc = 0
        lower = 0.0
        for i, n in enumerate(cells):
            if n and acc + n >= half:
                upper = LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else lower * 2
                return lower + (upper - lower) * (half - acc) / n
            acc += n
            lower = LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else lower
        return lower

    def histogram(self, op: int) -> tuple[list[tuple[float, int]], int, float]:
        """``([(upper_bound, cumulative_count), ...], count, sum_s)`` for ``op``; the last bound is +Inf."""
        acc = 0
        out: list[tuple[float, int]] = []
        cells = self.buckets[op]
        for bound, n in zip((*LATENCY_BOUNDS_S, float("inf")), cells):
            acc += n
            out.append((bound, acc))
        return out, acc, self.latency_sum_s[op]


class CommandStats:
    """The per-LUN statistics of one daemon. The portal calls :meth:`record` once per completed command."""

    __slots__ = ("luns",)

    def __init__(self) -> None:
        self.luns: dict[str, LunStats] = {}

    def lun(self, name: str) -> LunStats:
        s = self.luns.get(name)
        if s is None:
            s = self.luns[name] = LunStats()
        return s

    def forget(self, name: str) -> None:
        """A deleted LUN stops being reported (its series end rather than freeze)."""
        self.luns.pop(name, None)

    def record(self, name: str, session: dict[int, IoCounts], lun: int, opcode: int, good: bool, nbytes: int,
               seconds: float) -> None:
        """Count one command on LUN ``name`` (LUN number ``lun`` of the session whose counts are ``session``)."""
        op = OP_OF_OPCODE[opcode]
        s = self.luns.get(name)
        if s is None:
            s = self.luns[name] = LunStats()
        s.buckets[op][bucket(seconds)] += 1
        s.latency_sum_s[op] += seconds
        # Plain ints, not Op members: an enum attribute lookup costs more than the rest of this method.
        if op > _WRITE:
            return
        per = session.get(lun)
        if per is None:
            per = session[lun] = IoCounts()
        if op == _READ:
            s.io.reads += 1
            per.reads += 1
            if good:
                s.io.read_bytes += nbytes
                per.read_bytes += nbytes
        else:
            s.io.writes += 1
            per.writes += 1
            if good:
                s.io.write_bytes += nbytes
                per.write_bytes += nbytes

"""Prometheus metrics: every ``lunsync_*`` series is declared here, once, and read at scrape time.

This module owns the metric names, their help text and their labels, the custom collector that turns the data path's
plain-integer counters (:class:`lunsync.target.portal.Counters`, :class:`lunsync.target.stats.CommandStats`) and the
API's own counters into Prometheus families when ``/metrics`` is scraped, and the small ASGI app served on the
metrics port. Nothing on the hot path calls prometheus-client: one call per PDU halved throughput here. Labels stay
bounded: LUN name, operation, and a reason from a fixed enum; never an LBA, a task tag or an initiator port.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from lunsync.target import chap
from lunsync.target.pdu import RejectReason
from lunsync.target.portal import Server
from lunsync.target.scsi import xcopy
from lunsync.target.stats import OP_NAMES, CommandStats
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_asgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Login failures that dashboards chart even before the first one happens, so `rate()` has a series to work on.
_KNOWN_LOGIN_FAILURES = ("authentication_failure", "authorization_failure", "not_found")


def _le(bound: float) -> str:
    """A bucket bound as the exposition format writes it (``+Inf``, ``0.001``)."""
    return "+Inf" if bound == float("inf") else repr(bound)


@dataclass(slots=True)
class ApiCounters:
    """The management API's own counts, bumped by :mod:`lunsync.provider.api`."""

    unauthorized: int = 0
    requests: int = 0
    auth_throttled: int = 0


@dataclass(frozen=True, slots=True)
class LunInfo:
    """What the collector needs to know about one live LUN."""

    name: str
    size_bytes: int
    flush_failed: bool = False  # the backend's fdatasync failed: sticky, every later flush fails (until reopened)
    # a LUN shared by several gateways: does this one hold its ownership lease (None: not shared)
    alua_optimized: bool | None = None


class LunsyncCollector(Collector):
    """Reads the daemon's plain integers at scrape time and yields Prometheus families."""

    def __init__(self, server: Server, api: ApiCounters, luns: Callable[[], Iterable[LunInfo]]) -> None:
        self.server = server
        self.api = api
        self.luns = luns

    def describe(self) -> Iterable[Metric]:
        # Declaring nothing up front keeps registration from calling collect() before the array exists.
        return []

    def collect(self) -> Iterator[Metric]:
        stats: CommandStats = self.server.stats
        counters = self.server.counters
        live = list(self.luns())

        reads = CounterMetricFamily("lunsync_read_commands", "SCSI read commands completed, per LUN.", labels=["lun"])
        writes = CounterMetricFamily("lunsync_write_commands", "SCSI write commands completed, per LUN.",
                                     labels=["lun"])
        read_bytes = CounterMetricFamily("lunsync_read_bytes", "Bytes read by initiators (GOOD status), per LUN.",
                                         labels=["lun"])
        write_bytes = CounterMetricFamily("lunsync_write_bytes", "Bytes written by initiators (GOOD status), per LUN.",
                                          labels=["lun"])
        latency = HistogramMetricFamily("lunsync_command_latency_seconds",
                                        "SCSI command service time inside the target, per LUN and operation.",
                                        labels=["lun", "op"])
        capacity = GaugeMetricFamily("lunsync_lun_capacity_bytes", "Capacity of each LUN.", labels=["lun"])
        flush_failed = GaugeMetricFamily("lunsync_lun_flush_failed",
                                         "1 once a LUN's fdatasync has failed: every later flush fails too, and "
                                         "writes acknowledged before it may be lost.", labels=["lun"])
        optimized = GaugeMetricFamily("lunsync_lun_alua_optimized",
                                      "1 while this gateway owns a LUN that several gateways serve (its port group "
                                      "is active/optimized), 0 while another one does.", labels=["lun"])
        for lun in live:
            if lun.alua_optimized is not None:
                optimized.add_metric([lun.name], 1.0 if lun.alua_optimized else 0.0)
            s = stats.lun(lun.name)
            reads.add_metric([lun.name], s.io.reads)
            writes.add_metric([lun.name], s.io.writes)
            read_bytes.add_metric([lun.name], s.io.read_bytes)
            write_bytes.add_metric([lun.name], s.io.write_bytes)
            capacity.add_metric([lun.name], lun.size_bytes)
            flush_failed.add_metric([lun.name], 1.0 if lun.flush_failed else 0.0)
            for op, op_name in enumerate(OP_NAMES):
                buckets, _count, total_s = s.histogram(op)
                latency.add_metric([lun.name, op_name], [(_le(b), n) for b, n in buckets], total_s)
        yield from (reads, writes, read_bytes, write_bytes, latency, capacity, flush_failed, optimized)

        sessions = GaugeMetricFamily("lunsync_sessions", "iSCSI sessions in full feature phase (normal and discovery).")
        # Not the sessions a portal handed to a worker process (serve --workers): the worker counts those.
        sessions.add_metric([], sum(1 for _, p in self.server.sessions.items() if p.given is None))
        yield sessions
        connections = GaugeMetricFamily("lunsync_connections", "Open TCP connections on the iSCSI portals.")
        connections.add_metric([], counters.connections)
        yield connections
        yield CounterMetricFamily("lunsync_logins", "Logins that reached full feature phase.", value=counters.logins)
        yield CounterMetricFamily("lunsync_logouts", "Logout requests honoured.", value=counters.logouts)

        failures = CounterMetricFamily("lunsync_login_failures", "Failed logins, by login status.", labels=["reason"])
        seen = dict.fromkeys(_KNOWN_LOGIN_FAILURES, 0)
        seen.update(counters.login_failures)
        for reason, n in sorted(seen.items()):
            failures.add_metric([reason], n)
        yield failures
        rejects = CounterMetricFamily("lunsync_rejected_pdus", "PDUs answered with Reject, by reason.",
                                      labels=["reason"])
        # Every reason of RFC 7143 §11.17.1 from the start (11 series), so rate() works before the first Reject.
        seen_rejects = dict.fromkeys((r.name.lower() for r in RejectReason), 0)
        seen_rejects.update(counters.rejects)
        for reason, n in sorted(seen_rejects.items()):
            rejects.add_metric([reason], n)
        yield rejects
        # CHAP is the only authentication method, so every AUTHENTICATION FAILURE login status is a CHAP failure.
        yield CounterMetricFamily("lunsync_chap_failures", "Logins refused because CHAP authentication failed.",
                                  value=counters.login_failures.get("authentication_failure", 0))
        by_kind = CounterMetricFamily("lunsync_chap_failures_by_reason",
                                      "Failed CHAP exchanges, by why they failed (reflection: the initiator sent back "
                                      "the target's own challenge).", labels=["reason"])
        chap_seen = dict.fromkeys(chap.FAILURE_KINDS, 0)
        chap_seen.update(chap.COUNTERS.failures)
        for reason, n in sorted(chap_seen.items()):
            by_kind.add_metric([reason], n)
        yield by_kind
        yield CounterMetricFamily("lunsync_throttled_connections",
                                  "Connections held in the failed-login tarpit before their login was read.",
                                  value=counters.throttled_connections)
        yield CounterMetricFamily("lunsync_xcopy_refusals",
                                  "EXTENDED COPY commands refused because a copy target is not visible to the "
                                  "initiator (another target's LUN, or none).", value=xcopy.COUNTERS.unreachable_cscd)
        yield CounterMetricFamily("lunsync_api_unauthorized",
                                  "Management API requests refused for a missing or wrong bearer token.",
                                  value=self.api.unauthorized)
        yield CounterMetricFamily("lunsync_api_requests", "Management API requests answered.",
                                  value=self.api.requests)
        yield CounterMetricFamily("lunsync_api_auth_throttled",
                                  "Management API requests held because their address kept failing authentication.",
                                  value=self.api.auth_throttled)


def build_registry(server: Server, api: ApiCounters, luns: Callable[[], Iterable[LunInfo]]) -> CollectorRegistry:
    """A private registry (not prometheus-client's global one) holding the lunsync and process collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LunsyncCollector(server, api, luns))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def metrics_app(registry: CollectorRegistry) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app of the metrics port: ``/metrics`` (and ``/``) is the exposition, anything else a 404."""
    exposition = make_asgi_app(registry)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in ("/metrics", "/"):
            body = b"not found: the metrics are at /metrics\n"
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await exposition(scope, receive, send)

    return app


class SnapshotCollector(Collector):
    """Pools, copy-on-write and snapshots, read at scrape time from the daemon's
    :class:`~lunsync.provider.snapshot_service.SnapshotService` (``service()`` is None until the array has loaded).
    Labels: pool name, LUN name, snapshot state, and clone name (clones are few and made by an administrator)."""

    def __init__(self, service: Callable[[], Any]) -> None:
        self.service = service

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        svc = self.service()
        if svc is None:
            return
        used = GaugeMetricFamily("lunsync_pool_used_bytes", "Bytes the files of each snapshot pool hold on disk.",
                                 labels=["pool"])
        free = GaugeMetricFamily("lunsync_pool_free_bytes", "Bytes each snapshot pool can still take.", labels=["pool"])
        cap = GaugeMetricFamily("lunsync_pool_capacity_bytes", "Cap of each pool (its filesystem's size if uncapped).",
                                labels=["pool"])
        # With serve --workers every worker sees the same pool directories: the one holding the unmapped LUNs
        # reports them, so that the control's sum is the pool's.
        for rec in svc.cat.list_pools() if svc.array.holds_unmapped else ():
            usage = svc.pool_usage(rec)
            used.add_metric([rec.name], usage["used_bytes"])
            free.add_metric([rec.name], usage["free_bytes"])
            cap.add_metric([rec.name], usage["capacity_bytes"])
        yield from (used, free, cap)
        copies = CounterMetricFamily("lunsync_cow_copies", "Origin chunks preserved before their first overwrite.",
                                     labels=["lun"])
        latency = SummaryMetricFamily("lunsync_cow_copy_batch_seconds",
                                      "Copy-on-write group commits: copy, fdatasync and map commit, per batch.",
                                      labels=["lun"])
        failures = CounterMetricFamily("lunsync_cow_copy_failures", "Chunks whose preservation failed (pool full, "
                                       "I/O error); their snapshots were marked invalid.", labels=["lun"])
        staged = CounterMetricFamily("lunsync_cow_staged_writes", "First writes answered from the staging area "
                                     "(write cache on) before their preservation was durable.", labels=["lun"])
        staged_now = GaugeMetricFamily("lunsync_cow_staged_bytes", "Bytes of acknowledged writes held in the staging "
                                       "area, not yet on the LUN.", labels=["lun"])
        waits = CounterMetricFamily("lunsync_cow_stage_waits", "Writes that waited for room in a full staging area.",
                                    labels=["lun"])
        for name, vol in sorted(svc.volumes.items()):
            st = vol.stats
            copies.add_metric([name], st.copies)
            latency.add_metric([name], st.copy_batches, st.copy_seconds)
            failures.add_metric([name], st.copy_failures)
            staged.add_metric([name], st.staged_writes)
            staged_now.add_metric([name], st.staged_bytes)
            waits.add_metric([name], st.stage_waits)
        yield from (copies, latency, failures, staged, staged_now, waits)
        by_state = GaugeMetricFamily("lunsync_snapshots", "Snapshots by state.", labels=["state"])
        fill = GaugeMetricFamily("lunsync_clone_fill_ratio", "Fraction of each clone copied so far (1: independent).",
                                 labels=["snapshot"])
        counts = {"valid": 0, "invalid": 0, "filling": 0}
        for s in svc.cat.list_snapshots():
            if not svc.array.serves_lun(s.lun_name):
                continue  # another worker's (serve --workers), counted there
            if s.kind == "clone" and s.state == "valid":
                done, total = svc.fill_progress.get(s.id, (s.filled_chunks, s.total_chunks))
                fill.add_metric([s.full_name], 1.0 if s.filled else done / max(total, 1))
                if not s.filled:
                    counts["filling"] += 1
                    continue
            counts[s.state] += 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield from (by_state, fill)
        c = svc.counters
        yield CounterMetricFamily("lunsync_snapshots_invalidated", "Snapshots marked invalid by a failed preservation.",
                                  value=sum(v.stats.invalidated for v in svc.volumes.values()))
        yield GaugeMetricFamily("lunsync_snapshot_hold_last_seconds",
                                "How long the last snapshot (set) held new writes, measured in the daemon.",
                                value=c.last_hold_ms / 1000)
        yield CounterMetricFamily("lunsync_snapshot_hold_timeouts",
                                  "Snapshot sets abandoned because writes did not drain in time.",
                                  value=c.hold_timeouts)


# Families that describe one process; summed over processes they mean nothing (a sum of start times, of fd limits).
_PER_PROCESS_PREFIXES = ("process_", "python_")


def merge_expositions(texts: Mapping[str, str]) -> list[Metric]:
    """One exposition out of several processes' (``/metrics`` text by process name: the control's and each
    worker's), as the control serves it with ``--workers``: each series is summed over the processes that have it
    (every per-LUN series comes from the one worker owning the LUN; the portal counts add up), a ``_created``
    timestamp keeps the earliest, and the per-process families keep one series per process under a ``process``
    label, which is bounded by the number of workers. Families keep the first-seen order."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for proc, text in texts.items():
        for fam in text_string_to_metric_families(text):
            per_process = fam.name.startswith(_PER_PROCESS_PREFIXES)
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            acc = values[fam.name]
            for s in fam.samples:
                labels = {**s.labels, "process": proc} if per_process else s.labels
                key = (s.name, tuple(sorted(labels.items())))
                if key not in acc:
                    acc[key] = s.value
                elif s.name.endswith("_created"):
                    acc[key] = min(acc[key], s.value)
                else:
                    acc[key] += s.value
    for name, fam in families.items():
        for (sample, label_items), value in values[name].items():
            fam.add_sample(sample, dict(label_items), value)
    return list(families.values())


class MergedCollector(Collector):
    """Yields :func:`merge_expositions` of what ``texts()`` returns (the control refreshes it before each scrape)."""

    def __init__(self, texts: Callable[[], Mapping[str, str]]) -> None:
        self.texts = texts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from merge_expositions(self.texts())

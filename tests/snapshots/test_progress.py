"""RateWindow: bytes done over wall-clock time in a moving window, pauses included, with no rate before it has
seen enough time, and an ETA from that rate."""

from __future__ import annotations

import pytest
from lunsync.snapshots.progress import RateWindow

MIB = 1 << 20


def test_a_throttled_copy_reads_at_its_rate_sleeps_included() -> None:
    # 1 MiB copied in 10 ms, then 240 ms of throttle sleep: 4 MiB/s, not the 100 MiB/s of the copy itself.
    w = RateWindow(window_s=10.0)
    t, done = 0.0, 0
    w.add(t, done)
    for _ in range(40):
        t, done = t + 0.01, done + MIB
        w.add(t, done)
        t += 0.24
    assert w.rate_bps(t, done) == pytest.approx(4 * MIB, rel=0.01)
    assert w.eta_s(t, done, done + 8 * MIB) == pytest.approx(2.0, rel=0.01)


def test_no_rate_before_the_minimum_span_and_the_first_burst_fades() -> None:
    w = RateWindow(window_s=4.0, min_span_s=1.0)
    w.add(0.0, 0)
    w.add(0.01, 2 * MIB)  # a burst
    assert w.rate_bps(0.5, 2 * MIB) is None
    assert w.eta_s(0.5, 2 * MIB, 10 * MIB) is None
    for i in range(1, 101):
        w.add(0.01 + i * 0.1, 2 * MIB + i * MIB // 10)  # then 1 MiB/s for 10 s
    assert w.rate_bps(10.01, 12 * MIB) == pytest.approx(MIB, rel=0.02)  # the burst is out of the window


def test_a_stall_brings_the_rate_down_and_done_means_eta_zero() -> None:
    w = RateWindow(window_s=2.0)
    for i in range(21):
        w.add(i * 0.1, i * MIB)
    assert w.rate_bps(2.0, 20 * MIB) == pytest.approx(10 * MIB)
    assert w.rate_bps(4.5, 20 * MIB) == 0.0  # nothing done for longer than the window
    assert w.eta_s(4.6, 20 * MIB, 30 * MIB) is None
    assert w.eta_s(4.7, 30 * MIB, 30 * MIB) == 0.0


def test_the_window_stays_bounded_however_often_it_is_sampled() -> None:
    w = RateWindow(window_s=1.0, coalesce_s=0.05)
    for i in range(100_000):
        w.add(i * 0.001, i)
    assert len(w._samples) <= 1.0 / 0.05 + 3
    assert w.rate_bps(100.0, 100_000) == pytest.approx(1000, rel=0.1)

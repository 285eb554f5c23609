"""How fast a long copy goes and when it will end, measured, not inferred: bytes done over wall-clock time.

This module owns :class:`RateWindow`, the one estimate of rate and time remaining that restores (resync) and clone
fills report wherever they are shown: status, the API, the CLI's progress bar and the metrics. It is a moving window
of ``(time, bytes done)`` samples; the rate is the bytes done between the window's oldest sample and now, divided by
the time between them. Throttle sleeps, commits, waits for foreground writers and stalls therefore all count, which
a per-batch speed (bytes over the time spent copying them) leaves out: at ``--rate 5`` such a speed read 753 MiB/s.
Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import deque

__all__ = ["RateWindow"]


class RateWindow:
    """Rate and ETA of one copy from samples of its bytes done. ``window_s`` is how far back the rate looks;
    ``min_span_s`` how much time must be covered before any rate is given (the first batch of a throttled copy is
    a burst, and would otherwise read as the rate)."""

    def __init__(self, window_s: float = 10.0, min_span_s: float = 1.0, *, coalesce_s: float = 0.05) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._coalesce_s = coalesce_s  # samples closer than this replace each other: a bounded window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> None:
        """Record that ``done`` bytes were done at ``now`` (seconds, any monotonic clock)."""
        s = self._samples
        if len(s) >= 2 and now - s[-2][0] < self._coalesce_s:
            s[-1] = (now, done)
        else:
            s.append((now, done))
        # Keep one sample at or before the window's start, so the rate always spans the whole window.
        while len(s) >= 2 and s[1][0] <= now - self.window_s:
            s.popleft()

    def rate_bps(self, now: float, done: int) -> float | None:
        """Bytes per second over the window ending at ``(now, done)`` (recorded too); None until ``min_span_s``."""
        self.add(now, done)
        t0, d0 = self._samples[0]
        span = now - t0
        if span < self.min_span_s:
            return None
        return max(0.0, (done - d0) / span)

    def eta_s(self, now: float, done: int, total: int) -> float | None:
        """Seconds until ``total`` at the window's rate; 0 when done, None while there is no rate or no progress."""
        if done >= total:
            return 0.0
        rate = self.rate_bps(now, done)
        if not rate:
            return None
        return (total - done) / rate

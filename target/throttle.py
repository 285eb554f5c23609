"""Per-source rate limiting of failed logins (a brake on CHAP guessing), as a pure object with the clock passed in.

A source address that fails more than ``free_failures`` logins within ``window_s`` has every new connection held
before its login is read, for a delay that grows with each further failure up to ``max_delay_s``. A tarpit rather
than a ban: a legitimate initiator behind the same address still gets in, only slower, and nothing has to be
unblocked by hand.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass(slots=True)
class LoginThrottle:
    window_s: float = 60.0
    free_failures: int = 10
    step_s: float = 0.25
    max_delay_s: float = 5.0
    max_sources: int = 4096
    _failures: dict[str, collections.deque[float]] = field(default_factory=dict)

    def _recent(self, source: str, now: float) -> collections.deque[float] | None:
        q = self._failures.get(source)
        if q is None:
            return None
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            del self._failures[source]
            return None
        return q

    def record_failure(self, source: str, now: float) -> None:
        q = self._recent(source, now)
        if q is None:
            if len(self._failures) >= self.max_sources:
                # Bound the memory an address-spraying peer can make us hold: forget the stalest source.
                oldest = min(self._failures, key=lambda k: self._failures[k][-1])
                del self._failures[oldest]
            q = self._failures[source] = collections.deque()
        q.append(now)
        if len(q) > self.free_failures * 10:
            q.popleft()

    def delay(self, source: str, now: float) -> float:
        """How long a new connection from ``source`` is held before its login is read."""
        q = self._recent(source, now)
        excess = (len(q) if q else 0) - self.free_failures
        return 0.0 if excess <= 0 else min(self.max_delay_s, excess * self.step_s)

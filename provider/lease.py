"""The ownership lease of a LUN shared by several gateways, as a pure state machine (the clock is passed in).

One gateway owns a shared LUN: its port group is the LU's active/optimized one. Ownership is a lease in the cluster
(a RADOS ``cls_lock`` exclusive lock with a duration, which the OSD expires by its own clock, so gateways' clocks
need not agree). The owner renews it every third of its duration; another gateway tries to take it at the same
pace and gets it once the owner has stopped renewing for a whole duration. :class:`Lease` decides when to ask the
cluster and what the answers mean; :mod:`lunsync.provider.gateway` does the asking. Its one safety rule: a gateway
counts itself owner only until ``duration - margin`` after it *sent* its last successful request (the OSD started
the lock's clock no earlier than that), so it stops reporting active/optimized before any other gateway can take the
lease, whatever the network did to the reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(Enum):
    UNKNOWN = "unknown"  # no answer from the cluster yet (start-up, or the cluster is unreachable)
    OWNER = "owner"
    STANDBY = "standby"  # another gateway holds the lease


@dataclass(frozen=True, slots=True)
class View:
    """What the lease says now: this gateway's role and the owning gateway's id (``None`` when unknown)."""

    role: Role
    owner: str | None


class Lease:
    """The lease of one LUN as seen by gateway ``me``."""

    def __init__(self, me: str, duration_s: float, *, margin_s: float | None = None) -> None:
        if duration_s <= 0:
            raise ValueError("lease duration must be positive")
        self.me = me
        self.duration_s = duration_s
        self.margin_s = duration_s / 5 if margin_s is None else margin_s
        self.period_s = duration_s / 3
        self._owner: str | None = None
        self._valid_until = 0.0  # while owner: when our claim runs out
        self._next_try = 0.0  # when to ask the cluster next
        self._in_flight = False

    # -- queries ----------------------------------------------------------------------------------------------------

    def view(self, now: float) -> View:
        if self._owner == self.me:
            if now < self._valid_until:
                return View(Role.OWNER, self.me)
            return View(Role.UNKNOWN, None)  # our claim ran out before a renewal came back
        if self._owner is None:
            return View(Role.UNKNOWN, None)
        return View(Role.STANDBY, self._owner)

    def due(self, now: float) -> bool:
        """Should the caller send an acquire/renew request now? (True at most once until its answer arrives.)"""
        return not self._in_flight and now >= self._next_try

    def next_deadline(self, now: float) -> float:
        """The next time :meth:`due` or :meth:`view` can change: when to tick again."""
        times = [self._next_try]
        if self._owner == self.me and self._valid_until > now:
            times.append(self._valid_until)
        return max(now, min(times))

    # -- events -----------------------------------------------------------------------------------------------------

    def sent(self, now: float) -> float:
        """An acquire/renew request leaves now; returns the send time to pass back with its answer."""
        self._in_flight = True
        return now

    def acquired(self, sent_at: float, now: float) -> None:
        """The cluster granted (or renewed) the lease on the request sent at ``sent_at``."""
        self._in_flight = False
        self._owner = self.me
        self._valid_until = sent_at + self.duration_s - self.margin_s
        self._next_try = now + self.period_s

    def busy(self, owner: str | None, now: float) -> None:
        """Another gateway (``owner``, if the cluster said who) holds the lease: try again in a period."""
        self._in_flight = False
        # Even if our own claim has not run out yet, the cluster is the judge: it expired there (we were cut off).
        self._owner = owner if owner != self.me else None
        self._valid_until = 0.0
        self._next_try = now + self.period_s

    def failed(self, now: float) -> None:
        """The request failed (cluster unreachable, timeout). An owner keeps its claim until it runs out."""
        self._in_flight = False
        if self._owner != self.me:
            self._owner = None
        self._next_try = now + min(self.period_s, 1.0)

    def released(self) -> None:
        """We gave the lease up (shutdown): nobody owns it as far as we know."""
        self._owner = None
        self._valid_until = 0.0

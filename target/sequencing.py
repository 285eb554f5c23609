"""Sequence numbers of one connection (RFC 7143 §4.2.2 and §4.2.2.2): StatSN, the CmdSN window, and its tags.

A :class:`Sequencer` numbers the target's status responses and decides, for each PDU that carries a CmdSN, whether
it runs now, waits for the commands before it, or falls outside the window and is discarded. MaxCmdSN follows the
tasks in flight, so a connection never holds more than :data:`CMD_WINDOW` commands. It also hands out the target
transfer tags. No I/O, no clock.
"""

from __future__ import annotations

import enum
from typing import Final, Generic, TypeVar

CMD_WINDOW: Final = 128
SERIAL_HALF: Final = 1 << 31
MASK32: Final = 0xFFFFFFFF

P = TypeVar("P")


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit sequence numbers."""
    return a != b and ((b - a) & MASK32) < SERIAL_HALF


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


class Admit(enum.IntEnum):
    """What becomes of a PDU with a CmdSN."""

    NOW = 0  # immediate, or the CmdSN expected next (ExpCmdSN has moved past it)
    QUEUED = 1  # inside the window but early: kept until the commands before it arrive
    DISCARDED = 2  # outside the window: silently dropped (RFC 7143 §4.2.2.1)


class Sequencer(Generic[P]):
    """StatSN, ExpCmdSN, MaxCmdSN and the commands received ahead of their turn."""

    def __init__(self) -> None:
        self.stat_sn = 0
        self.exp_cmd_sn = 0
        self.max_cmd_sn = 0
        self.inflight = 0  # commands admitted and not yet answered; they narrow the window
        self.queued: dict[int, tuple[P, bytes]] = {}  # CmdSN -> PDU and its data, waiting for its turn
        self._ttt = 0

    def start(self, cmd_sn: int, exp_stat_sn: int) -> None:
        """The first Login Request sets both sequences (RFC 7143 §11.12.7)."""
        self.stat_sn = exp_stat_sn
        self.exp_cmd_sn = cmd_sn
        self.max_cmd_sn = (cmd_sn + CMD_WINDOW - 1) & MASK32

    def next_stat_sn(self) -> int:
        sn = self.stat_sn
        self.stat_sn = (sn + 1) & MASK32
        return sn

    def next_ttt(self) -> int:
        """A fresh Target Transfer Tag (R2T, NOP-In ping, Text continuation): never 0 nor the reserved 0xffffffff."""
        self._ttt = self._ttt % 0x7FFFFFFF + 1
        return self._ttt

    def admit(self, p: P, cmd_sn: int, immediate: bool, data: memoryview) -> Admit:
        """Place a received PDU: run it now, keep it (a copy of ``data`` with it) for later, or drop it."""
        if immediate:
            return Admit.NOW
        if cmd_sn == self.exp_cmd_sn:
            self.exp_cmd_sn = (cmd_sn + 1) & MASK32
            return Admit.NOW
        if sn_lt(self.exp_cmd_sn, cmd_sn) and sn_le(cmd_sn, self.max_cmd_sn) and len(self.queued) < CMD_WINDOW:
            self.queued[cmd_sn] = (p, bytes(data))
            return Admit.QUEUED
        return Admit.DISCARDED

    def next_queued(self) -> tuple[P, bytes] | None:
        """The queued PDU whose turn it now is, if any; ExpCmdSN moves past it."""
        queued = self.queued
        if not queued:
            return None
        entry = queued.pop(self.exp_cmd_sn, None)
        if entry is not None:
            self.exp_cmd_sn = (self.exp_cmd_sn + 1) & MASK32
        return entry

    def update_window(self) -> None:
        """Move MaxCmdSN forward as far as the tasks in flight allow; it never moves back (RFC 7143 §4.2.2.1)."""
        mx = (self.exp_cmd_sn + CMD_WINDOW - 1 - self.inflight) & MASK32
        if sn_lt(self.max_cmd_sn, mx):
            self.max_cmd_sn = mx

    def task_done(self) -> None:
        """A command admitted earlier was answered or ended: widen the window again."""
        self.inflight -= 1
        self.update_window()

"""Asymmetric logical unit access (SPC-4 §5.15): target port groups, their access states, and REPORT TARGET PORT
GROUPS' encoding.

lunsync's ALUA is implicit (TPGS 01b): the initiator cannot set states, the target changes them itself. A LU served
by one daemon has one group, always active/optimized. A LU shared by several gateways has one group per gateway and
an :class:`AluaGroups` that says which gateway owns the LU: the owner's group is active/optimized and preferred, every
other group active/non-optimized. Both states are active, so I/O down any path succeeds; the states only steer the
initiator's path selection (MPIO's "Round Robin With Subset", multipathd's ``prio alua``) to the owner. Everything
here is pure: who owns the LU is decided elsewhere (a lease in the cluster) and handed in with :meth:`set_owner`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class AccessState(IntEnum):
    """ASYMMETRIC ACCESS STATE (SPC-4 Table 249)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    TRANSITIONING = 0xF


# Supported-state bits of a descriptor's byte 1 (SPC-4 Table 248): AO_SUP | AN_SUP, the two states lunsync reports.
SUPPORTED_STATES = 0x01 | 0x02

# STATUS CODE (SPC-4 Table 250): why the group is in its state.
STATUS_NONE = 0x00
STATUS_IMPLICIT = 0x02  # altered by implicit ALUA behaviour: a failover moved the LU's ownership

_DESCRIPTOR = struct.Struct(">BBHxBxB")  # SPC-4 §6.37 Table 248, 8 bytes before the target port descriptors
_PORT = struct.Struct(">2xH")  # Table 251: reserved, RELATIVE TARGET PORT IDENTIFIER


@dataclass(frozen=True, slots=True)
class PortGroup:
    """One target port group as RTPG reports it."""

    group_id: int
    ports: tuple[int, ...]
    state: AccessState = AccessState.ACTIVE_OPTIMIZED
    preferred: bool = False
    status: int = STATUS_NONE


def encode_rtpg(groups: list[PortGroup], *, extended: bool, transition_time_s: int = 0) -> bytes:
    """REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.37): the length header (the extended one when asked, with
    the implicit transition time) and one descriptor per group, in the order given. Not truncated to the CDB's
    allocation length; the caller does that."""
    body = bytearray()
    for g in groups:
        body += _DESCRIPTOR.pack((0x80 if g.preferred else 0) | int(g.state), SUPPORTED_STATES, g.group_id, g.status,
                                 len(g.ports))
        for port in g.ports:
            body += _PORT.pack(port)
    if extended:
        head = struct.pack(">IBB2x", len(body) + 4, 0x10, min(transition_time_s, 255))
    else:
        head = struct.pack(">I", len(body))
    return head + bytes(body)


class AluaGroups:
    """The port groups of a LU shared by several gateways, and which of them owns it.

    ``groups`` maps each gateway's target port group to its relative target port identifiers (distinct across
    gateways, since SPC-4 numbers the ports of one SCSI target device). ``owner`` is the owning group, or ``None``
    while nobody holds the lease (every group then reports active/non-optimized: still usable, nobody preferred).
    """

    def __init__(self, groups: dict[int, tuple[int, ...]], owner: int | None = None,
                 transition_time_s: int = 0) -> None:
        self.groups = dict(sorted(groups.items()))
        self.owner = owner
        self.transition_time_s = transition_time_s
        self._changed = False  # a failover has happened: report STATUS_IMPLICIT from now on

    def set_owner(self, owner: int | None) -> bool:
        """Record ``owner``; True when that changed any group's state (the caller then raises the unit attention)."""
        if owner == self.owner:
            return False
        self.owner = owner
        self._changed = True
        return True

    def set_groups(self, groups: dict[int, tuple[int, ...]]) -> bool:
        """Replace the group map (a gateway joined or left); True when it changed."""
        new = dict(sorted(groups.items()))
        if new == self.groups:
            return False
        self.groups = new
        return True

    def state_of(self, group_id: int) -> AccessState:
        return AccessState.ACTIVE_OPTIMIZED if group_id == self.owner else AccessState.ACTIVE_NON_OPTIMIZED

    def descriptors(self) -> list[PortGroup]:
        status = STATUS_IMPLICIT if self._changed else STATUS_NONE
        return [PortGroup(g, ports, self.state_of(g), g == self.owner, status) for g, ports in self.groups.items()]

"""Unit tests for lunsync.target.scsi.alua: RTPG encoding (SPC-4 §6.37) and the owner/non-owner states of a LU
shared by two gateways, through the real dispatcher."""

from __future__ import annotations

import struct

from lunsync.target.scsi.alua import AccessState, AluaGroups, PortGroup, encode_rtpg
from lunsync.target.scsi.task import Nexus, Status

from tests.target.scsi.memdev import Session, make_target, sense_of

RTPG = bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
RTPG_EXT = bytes([0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])


def test_encode_two_groups_hex() -> None:
    groups = [PortGroup(1, (1,), AccessState.ACTIVE_OPTIMIZED, True), PortGroup(2, (2,), AccessState.ACTIVE_NON_OPTIMIZED)]
    assert encode_rtpg(groups, extended=False).hex() == (
        "00000018"  # RETURN DATA LENGTH: 2 * (8 + 4)
        "80030001" "00000001" "00000001"  # PREF | AO, AO_SUP|AN_SUP, group 1, one port: relative port 1
        "01030002" "00000001" "00000002"  # AN, group 2, relative port 2
    )


def test_encode_extended_header_carries_transition_time() -> None:
    d = encode_rtpg([PortGroup(7, (7, 8))], extended=True, transition_time_s=10)
    assert struct.unpack_from(">IBB", d) == (len(d) - 4, 0x10, 10)
    assert d[8 + 7] == 2 and d[16:24] == bytes.fromhex("0000000700000008")


def test_owner_change_flips_states_and_raises_ua() -> None:
    t, lu, _ = make_target()
    lu.alua = AluaGroups({1: (1,), 2: (2,)}, owner=1, transition_time_s=10)
    on_a = Session(t, Nexus("iqn.2026-01.test:h", 1, t.name, 1, 1))
    on_b = Session(t, Nexus("iqn.2026-01.test:h", 1, t.name, 2, 2))
    d = bytes(on_b.cmd(RTPG).data or b"")
    assert (d[4], d[6:8], d[16], d[18:20]) == (0x80, b"\x00\x01", 0x01, b"\x00\x02")
    assert d[9] == 0  # no status: nothing has changed yet

    lu.set_alua_owner(2)  # gateway 1 lost the lease, gateway 2 took it
    for s in (on_a, on_b):
        r = s.cmd(RTPG)
        assert r.status == Status.CHECK_CONDITION and sense_of(r) == (6, 0x2A, 0x06)
    d = bytes(on_a.cmd(RTPG_EXT).data or b"")
    assert d[8] == AccessState.ACTIVE_NON_OPTIMIZED and d[8 + 12] == 0x80 | AccessState.ACTIVE_OPTIMIZED
    assert d[8 + 5] == 0x02 and d[5] == 10  # altered by implicit ALUA behaviour; implicit transition time

    lu.set_alua_owner(2)  # the same owner again: no new unit attention
    assert on_a.cmd(RTPG).status == Status.GOOD


def test_no_owner_reports_every_group_non_optimized() -> None:
    t, lu, _ = make_target()
    lu.alua = AluaGroups({1: (1,), 2: (2,)})
    d = bytes(Session(t).cmd(RTPG).data or b"")
    assert (d[4], d[16]) == (AccessState.ACTIVE_NON_OPTIMIZED, AccessState.ACTIVE_NON_OPTIMIZED)


def test_single_daemon_reports_its_groups_active_optimized() -> None:
    t, _, _ = make_target()
    d = bytes(Session(t).cmd(RTPG).data or b"")
    assert d.hex() == "0000000c" "80030001" "00000001" "00000001"

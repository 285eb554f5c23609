"""Unit tests for lunsync.target.scsi.lu: unit attentions, mode state and resets."""

from __future__ import annotations

from lunsync.target.scsi import sense as S
from lunsync.target.scsi.lu import PAGE_CACHING, PAGE_CONTROL, LogicalUnit
from tests.target.scsi.memdev import IDENTITY, NEXUS_A, NEXUS_B, MemDevice


def make() -> LogicalUnit:
    return LogicalUnit(MemDevice(), IDENTITY)


def test_new_nexus_sees_power_on_reset_once() -> None:
    lu = make()
    assert lu.take_ua(NEXUS_A) == S.POWER_ON_RESET
    assert lu.take_ua(NEXUS_A) is None


def test_capacity_change_reaches_every_known_nexus_in_order() -> None:
    lu = make()
    lu.take_ua(NEXUS_A)
    lu.take_ua(NEXUS_B)
    lu.notify_capacity_changed()
    lu.notify_capacity_changed()  # queued once
    lu.add_ua_all(S.REPORTED_LUNS_DATA_HAS_CHANGED)
    assert lu.take_ua(NEXUS_A) == S.CAPACITY_DATA_HAS_CHANGED
    assert lu.take_ua(NEXUS_A) == S.REPORTED_LUNS_DATA_HAS_CHANGED
    assert lu.take_ua(NEXUS_A) is None
    assert lu.take_ua(NEXUS_B) == S.CAPACITY_DATA_HAS_CHANGED


def test_reset_spares_issuer_and_drops_legacy_reservation() -> None:
    lu = make()
    lu.take_ua(NEXUS_A)
    lu.take_ua(NEXUS_B)
    lu.legacy_holder = NEXUS_B
    lu.reset(issuer=NEXUS_A)
    assert lu.legacy_holder is None
    assert lu.take_ua(NEXUS_A) is None
    assert lu.take_ua(NEXUS_B) == S.BUS_DEVICE_RESET_FUNCTION


def test_mode_page_drives_wce_and_swp() -> None:
    lu = make()
    lu.take_ua(NEXUS_A)
    lu.take_ua(NEXUS_B)
    assert lu.wce and not lu.write_protected
    caching = bytearray(lu.mode.current[PAGE_CACHING])
    caching[2] &= ~0x04
    lu.apply_mode_page(PAGE_CACHING, caching, save=False, nexus=NEXUS_A)
    assert not lu.wce
    control = bytearray(lu.mode.current[PAGE_CONTROL])
    control[4] |= 0x08
    lu.apply_mode_page(PAGE_CONTROL, control, save=False, nexus=NEXUS_A)
    assert lu.write_protected
    assert lu.take_ua(NEXUS_B) == S.MODE_PARAMETERS_CHANGED
    assert lu.take_ua(NEXUS_A) is None


def test_read_only_device_is_write_protected() -> None:
    assert LogicalUnit(MemDevice(read_only=True), IDENTITY).write_protected


def test_forget_nexus_keeps_reservations() -> None:
    lu = make()
    lu.take_ua(NEXUS_A)
    lu.legacy_holder = NEXUS_A
    lu.forget_nexus(NEXUS_A)
    assert lu.legacy_holder == NEXUS_A
    assert lu.take_ua(NEXUS_A) == S.POWER_ON_RESET

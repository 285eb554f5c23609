"""Unit tests for lunsync.target.scsi.lu: unit attentions, mode state, resets and the write gate."""

from __future__ import annotations

import asyncio

from lunsync.target.scsi import sense as S
from lunsync.target.scsi.lu import PAGE_CACHING, PAGE_CONTROL, LogicalUnit, WriteGate

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


def test_reset_warns_every_nexus_and_drops_legacy_reservation() -> None:
    lu = make()
    lu.take_ua(NEXUS_A)
    lu.take_ua(NEXUS_B)
    lu.legacy_holder = NEXUS_B
    lu.reset()
    assert lu.legacy_holder is None
    assert lu.take_ua(NEXUS_A) == S.BUS_DEVICE_RESET_FUNCTION
    assert lu.take_ua(NEXUS_B) == S.BUS_DEVICE_RESET_FUNCTION
    assert lu.take_ua(NEXUS_A) is None


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


# -- WriteGate --------------------------------------------------------------------------------------------------------


async def _spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_write_gate_queues_only_overlapping_writes_behind_an_exclusive_hold() -> None:
    async def main() -> list[object]:
        gate = WriteGate()
        order: list[object] = []

        async def write(lba: int) -> None:
            async with gate.write(lba, 1):
                order.append(lba)

        async with gate.exclusive(10, 5):
            inside = asyncio.create_task(write(14))
            outside = asyncio.create_task(write(15))
            await _spin()
            order.append("exclusive done")
        await asyncio.gather(inside, outside)
        assert gate.active == 0 and gate.untracked == 0 and not gate._queue
        return order

    assert asyncio.run(main()) == [15, "exclusive done", 14]


def test_write_gate_exclusive_waits_for_writes_already_in_flight() -> None:
    async def main() -> None:
        gate = WriteGate()
        release = asyncio.Event()
        got: list[str] = []

        async def slow_write() -> None:
            async with gate.write(0, 1):  # untracked: no exclusive holder when it began
                await release.wait()
                got.append("write")

        async def caw() -> None:
            async with gate.exclusive(0, 1):
                got.append("caw")

        w = asyncio.create_task(slow_write())
        await _spin()
        assert gate.untracked == 1
        c = asyncio.create_task(caw())
        await _spin()
        assert got == []  # the compare must not read around a write that is still landing
        release.set()
        await asyncio.gather(w, c)
        assert got == ["write", "caw"]

    asyncio.run(main())


def test_write_gate_is_fifo_among_exclusives_and_clean_after_cancel() -> None:
    async def main() -> None:
        gate = WriteGate()
        got: list[int] = []

        async def caw(n: int) -> None:
            async with gate.exclusive(0, 8):
                got.append(n)
                await asyncio.sleep(0)

        async with gate.exclusive(0, 8):
            waiters = [asyncio.create_task(caw(n)) for n in (1, 2, 3)]
            doomed = asyncio.create_task(caw(4))
            await _spin()
            doomed.cancel()
        await asyncio.gather(*waiters)
        assert got == [1, 2, 3]
        assert doomed.cancelled() and gate.active == 0 and not gate._queue

    asyncio.run(main())


def test_reset_of_a_shared_lu_is_told_to_the_other_gateways_once() -> None:
    lu = make()
    lu.take_ua(NEXUS_A)
    told: list[S.Asc] = []

    async def applied() -> None:
        return None

    def tell(asc: S.Asc) -> asyncio.Future[None]:
        told.append(asc)
        return asyncio.ensure_future(applied(), loop=loop)

    loop = asyncio.new_event_loop()
    try:
        lu.on_reset = tell
        lu.reset(asc=S.BUS_DEVICE_RESET_FUNCTION)
        waits = lu.take_peer_waits()
        assert told == [S.BUS_DEVICE_RESET_FUNCTION] and len(waits) == 1 and lu.take_peer_waits() == []
        loop.run_until_complete(asyncio.gather(*waits))
        lu.reset(asc=S.POWER_ON_RESET, from_peer=True)  # a reset arriving from another gateway is not sent back
        assert told == [S.BUS_DEVICE_RESET_FUNCTION] and lu.take_peer_waits() == []
        assert lu.take_ua(NEXUS_A) == S.POWER_ON_RESET
    finally:
        loop.close()

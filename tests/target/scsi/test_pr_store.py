"""Unit tests for the store seam of lunsync.target.scsi.pr: the state's serialisation, and a PR cycle split across two
gateways that share one compare-and-write object (an in-memory stand-in for the RADOS object, with its version and
its notify), including a lost race that must be decided again on the fresh state."""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

from lunsync.target.scsi.lu import LogicalUnit
from lunsync.target.scsi.pr import WR_EX, PrState, Registration, StalePr, adopt
from lunsync.target.scsi.target import ScsiTarget
from lunsync.target.scsi.task import Nexus, Status

from tests.target.scsi.memdev import IDENTITY, MemDevice, Session, cdb10, sense_of
from tests.target.scsi.test_pr import do, prin

IQN = "iqn.2026-11.io.lunsync:shared"
HOST1, HOST2 = "iqn.1991-05.com.microsoft:node1", "iqn.1991-05.com.microsoft:node2"
K1, K2 = 0x1111, 0x2222


class SharedObject:
    """One versioned object and the LUs watching it."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None
        self.version = 0
        self.watchers: list[LogicalUnit] = []
        self.commits = 0


class SharedStore:
    """A shared store over :class:`SharedObject`: commit asserts the version last fetched, then notifies the others."""

    shared = True

    def __init__(self, obj: SharedObject) -> None:
        self.obj = obj
        self.seen = 0
        self.lu: LogicalUnit | None = None
        self.before_commit: list[Any] = []  # callables run once before the next commit (to lose a race on purpose)

    async def fetch(self) -> dict[str, Any] | None:
        self.seen = self.obj.version
        return copy.deepcopy(self.obj.doc)

    async def commit(self, doc: dict[str, Any]) -> None:
        while self.before_commit:
            self.before_commit.pop(0)()
        if self.obj.version != self.seen:
            raise StalePr()
        self.obj.doc = json.loads(json.dumps(doc))  # what crosses the wire is JSON
        self.obj.version += 1
        self.obj.commits += 1
        self.seen = self.obj.version
        for lu in self.obj.watchers:
            if lu is not self.lu:
                adopt(lu, copy.deepcopy(self.obj.doc))


def gateway(obj: SharedObject, group: int) -> tuple[ScsiTarget, LogicalUnit, SharedStore]:
    store = SharedStore(obj)
    lu = LogicalUnit(MemDevice(), IDENTITY, name="shared")
    lu.pr = PrState(store=store)
    store.lu = lu
    obj.watchers.append(lu)
    return ScsiTarget(IQN, {0: lu}, port_groups={group: (group,)}), lu, store


def nexus(host: str, group: int) -> Nexus:
    return Nexus(host, 0x400001370000, IQN, group, group)


def test_doc_round_trip_keeps_holder_by_position() -> None:
    pr = PrState()
    pr.registrations = [Registration(K1, HOST1, 1, f"{IQN},t,0x0001", 1),
                        Registration(K2, HOST2, 2, f"{IQN},t,0x0002", 2, all_tg_pt=True)]
    pr.holder, pr.res_type, pr.generation, pr.aptpl = pr.registrations[1], WR_EX, 7, True
    doc = json.loads(json.dumps(pr.doc()))
    assert doc["holder"] == 1 and doc["aptpl"] is True
    back = PrState()
    back.apply(doc)
    assert back.doc() == pr.doc() and back.holder is back.registrations[1]
    doc["holder"] = 5  # a holder that is not registered: the reservation is not trusted
    back.apply(doc)
    assert back.res_type == 0 and back.holder is None


def test_windows_cycle_split_across_gateways() -> None:
    obj = SharedObject()
    ta, lua, _ = gateway(obj, 1)
    tb, lub, _ = gateway(obj, 2)
    n1a, n2b = Session(ta, nexus(HOST1, 1)), Session(tb, nexus(HOST2, 2))
    n2a = Session(ta, nexus(HOST2, 1))  # node 2 also has a path through gateway A
    # Both nodes register (on both of their paths, as the Microsoft initiator does per I_T nexus).
    assert do(n1a, 0, sa_key=K1) == Status.GOOD
    assert do(n2b, 0, sa_key=K2) == Status.GOOD
    assert do(n2a, 0, sa_key=K2) == Status.GOOD
    keys = bytes(n1a.cmd(prin(0)).data or b"")
    assert struct.unpack_from(">II", keys) == (3, 24)  # gateway A sees gateway B's registration
    # Node 1 reserves Write Exclusive - Registrants Only through A; node 2 is a registrant, so writes pass on B...
    assert do(n1a, 1, key=K1, rtype=5) == Status.GOOD
    assert lub.pr.res_type == 5  # adopted from the notify, before any PR command on B
    assert n2b.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.GOOD
    # ...while an unregistered host on B conflicts, in the per-command check that never reads the store.
    stranger = Session(tb, Nexus("iqn.2026-01.test:x", 9, IQN, 2, 2))
    assert stranger.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.RESERVATION_CONFLICT
    # The cluster arbitrates: node 2 preempts node 1's key through B and takes a Write Exclusive reservation.
    assert do(n2b, 4, key=K2, sa_key=K1, rtype=WR_EX) == Status.GOOD
    assert lua.pr.res_type == WR_EX and [r.key for r in lua.pr.registrations] == [K2, K2]
    r = n1a.cmd(cdb10(0x2A, 0, 1), bytes(512))
    assert r.status == Status.CHECK_CONDITION and sense_of(r) == (6, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED, on A
    assert n1a.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.RESERVATION_CONFLICT
    # Write Exclusive: only the holding I_T nexus writes, not node 2's other path.
    assert n2a.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.RESERVATION_CONFLICT
    # Node 2 releases through A (it registered that path too, but holds the reservation only through B).
    assert do(n2b, 2, key=K2, rtype=WR_EX) == Status.GOOD
    assert lua.pr.res_type == 0 and n1a.cmd(cdb10(0x28, 0, 1)).status == Status.GOOD


def test_lost_race_is_decided_again_on_fresh_state() -> None:
    obj = SharedObject()
    ta, _, store_a = gateway(obj, 1)
    tb, _, _ = gateway(obj, 2)
    n1a, n2b = Session(ta, nexus(HOST1, 1)), Session(tb, nexus(HOST2, 2))
    do(n1a, 0, sa_key=K1)
    do(n2b, 0, sa_key=K2)
    def b_reserves_first() -> None:  # gateway B's commit lands between A's read and A's commit
        assert obj.doc is not None
        obj.doc = {**obj.doc, "res_type": WR_EX, "holder": 1, "generation": obj.doc["generation"]}
        obj.version += 1

    # A decides to reserve on what it read; the store refuses that commit, and A decides again and conflicts.
    store_a.before_commit.append(b_reserves_first)
    assert do(n1a, 1, key=K1, rtype=WR_EX) == Status.RESERVATION_CONFLICT
    assert obj.doc is not None and obj.doc["res_type"] == WR_EX and obj.doc["holder"] == 1


def test_reserve_and_release_6_10_are_refused_on_a_shared_lu() -> None:
    """A RESERVE(6)/(10) reservation would hold on one gateway only: on a shared LU it is refused as unsupported,
    and holds nothing, so the other gateway's paths still write."""
    obj = SharedObject()
    ta, lua, _ = gateway(obj, 1)
    tb, _, _ = gateway(obj, 2)
    a, b = Session(ta, nexus(HOST1, 1)), Session(tb, nexus(HOST2, 2))
    for cdb in (bytes([0x16, 0, 0, 0, 0, 0]), bytes([0x17, 0, 0, 0, 0, 0]), bytes(cdb10(0x56, 0, 0)),
                bytes(cdb10(0x57, 0, 0))):
        r = a.cmd(cdb)
        assert r.status == Status.CHECK_CONDITION and sense_of(r) == (5, 0x20, 0x00), cdb.hex()  # INVALID OPCODE
    assert lua.legacy_holder is None
    assert b.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.GOOD
    # A LU of one gateway (a local store) keeps RESERVE(6): the other nexus then conflicts.
    local = LogicalUnit(MemDevice(), IDENTITY, name="local")
    t = ScsiTarget(IQN, {0: local})
    one, two = Session(t, nexus(HOST1, 1)), Session(t, nexus(HOST2, 1))
    assert one.cmd(bytes([0x16, 0, 0, 0, 0, 0])).status == Status.GOOD
    assert two.cmd(cdb10(0x2A, 0, 1), bytes(512)).status == Status.RESERVATION_CONFLICT

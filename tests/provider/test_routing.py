"""The control's routing table: each request to the worker that owns what it names, lists fanned out, status local,
and work over LUNs of several workers recognised as such (with the members by worker)."""

from __future__ import annotations

from lunsync.provider import routing
from lunsync.provider.routing import FanOut, Forward, Local, MapLun, Place, SpansWorkers, route

TARGETS = {"iqn.2026-11.io.lunsync:a": 0, "iqn.2026-11.io.lunsync:b": 1}
LUNS = {"a0": 0, "b0": 1, "b1": 1, "free": 0}
SERIALS = {"SA0": "a0", "SB0": "b0"}
SETS = {"rs1": 1}

WHERE = routing.Placement(lambda iqn: TARGETS.get(iqn.lower()), LUNS.get, SETS.get, SERIALS.get)
A, B = "iqn.2026-11.io.lunsync:a", "iqn.2026-11.io.lunsync:b"


def test_one_target_or_lun_goes_to_its_owner() -> None:
    assert route("GET", f"/v1/targets/{B}", None, WHERE) == Forward(1)
    assert route("PUT", f"/v1/targets/{B}/chap", {"user": "u"}, WHERE) == Forward(1)
    assert route("POST", f"/v1/targets/{B}/acls", {"initiator": "x"}, WHERE) == Forward(1)
    assert route("POST", "/v1/luns/b1/resize", {"size": "1GiB"}, WHERE) == Forward(1)
    assert route("GET", "/v1/luns/a0", None, WHERE) == Forward(0)
    assert route("DELETE", "/v1/snapshots/b0@s1", None, WHERE) == Forward(1)
    # Unknown names go to worker 0, whose API answers 404 as one process would.
    assert route("GET", "/v1/targets/iqn.2026-11.io.lunsync:nosuch", None, WHERE) == Forward(0)
    assert route("GET", "/v1/luns/nosuch", None, WHERE) == Forward(0)


def test_changes_that_move_luns_ask_for_a_refresh() -> None:
    assert route("DELETE", f"/v1/targets/{B}/luns/b0", None, WHERE) == Forward(1, refresh=True)
    assert route("DELETE", f"/v1/targets/{B}", None, WHERE) == Forward(1, refresh=True, forget_target=B)
    assert route("POST", f"/v1/targets/{B}/luns", {"name": "free"}, WHERE) == MapLun(B, "free")
    assert route("POST", "/v1/targets", {"iqn": "iqn.2026-11.io.lunsync:new"}, WHERE) == Place(
        "iqn.2026-11.io.lunsync:new")
    # A body that is not a target's goes to a worker, whose validation answers 422.
    assert route("POST", "/v1/targets", {"iqn": 5}, WHERE) == Forward(0)
    assert route("POST", "/v1/targets", None, WHERE) == Forward(0)


def test_lists_fan_out_and_the_catalogs_own_go_to_worker_0() -> None:
    assert route("GET", "/v1/targets", None, WHERE) == FanOut("targets")
    assert route("GET", "/v1/sessions", None, WHERE) == FanOut("concat", "tsih")
    assert route("GET", "/v1/snapshots", None, WHERE) == FanOut("snapshots")
    assert route("GET", "/v1/recovery", None, WHERE) == FanOut("recovery")
    assert route("GET", "/v1/luns", None, WHERE) == Forward(0)
    assert route("GET", "/v1/export", None, WHERE) == Forward(0)
    assert route("GET", "/openapi.json", None, WHERE) == Forward(0)
    assert route("GET", "/v1/status", None, WHERE) == Local("status")
    assert route("GET", "/v1/portals", None, WHERE) == Local("portals")
    assert route("DELETE", "/v1/sessions/7", None, WHERE) == Local("logout", "7")


def test_snapshot_sets_span_workers_restores_and_exposures_go_where_they_are_served() -> None:
    d = route("POST", "/v1/snapshots", {"snapshots": ["a0@s", "b0@s", "b1@s"]}, WHERE)
    assert isinstance(d, SpansWorkers) and d.members == {0: ["a0"], 1: ["b0", "b1"]}
    assert "spans workers" in d.message() and "worker 1: b0, b1" in d.message()
    assert route("POST", "/v1/snapshots", {"snapshots": ["b0@s", "b1@s"]}, WHERE) == Forward(1)
    # A restore runs where its destination is served, whatever worker the snapshot's LUN is on; one whose
    # destinations are two workers' spans (the control runs it in parts), and so does any request about such a set.
    assert route("POST", "/v1/recovery/resync", {"pairs": [{"snapshot": "b0@s", "destination": "a0"}]},
                 WHERE) == Forward(0, remember_set=True)
    d = route("POST", "/v1/recovery/resync", {"pairs": [{"snapshot": "b0@s", "destination": "a0"},
                                                        {"snapshot": "b0@t", "destination": "b1"}]}, WHERE)
    assert isinstance(d, SpansWorkers) and d.members == {0: ["a0"], 1: ["b1"]} and d.what == routing.RECOVERY_SET
    assert "destination LUNs" in d.message(), d.message()
    spanning = routing.Placement(WHERE.target_owner, WHERE.lun_owner, WHERE.set_owner, WHERE.serial_lun,
                                 WHERE.exposed_on, {"0123456789ab"}.__contains__)
    for method, path in (("GET", ""), ("POST", "/cancel"), ("POST", "/wait"), ("POST", "/pairs")):
        d = route(method, f"/v1/recovery/0123456789ab{path}", {}, spanning)
        assert d == SpansWorkers(routing.RECOVERY_SET), (method, path, d)
    assert route("GET", "/v1/recovery/0123456789ab", None, WHERE) == FanOut("find")
    assert route("POST", "/v1/recovery/resync", {"pairs": [{"snapshot": "b0@s"}]}, WHERE) == Forward(
        1, remember_set=True)
    # An exposure is served by its target's worker, wherever the snapshot's LUN is; unexposing goes there too.
    assert route("POST", "/v1/snapshots/b0@s/expose", {"target": A}, WHERE) == Forward(0)
    assert route("POST", "/v1/snapshots/b0@s/expose", {"target": B}, WHERE) == Forward(1)
    exposed = routing.Placement(WHERE.target_owner, WHERE.lun_owner, WHERE.set_owner, WHERE.serial_lun,
                                {"b0@s": A}.get)
    assert route("DELETE", "/v1/snapshots/b0@s/expose", None, exposed) == Forward(0)
    assert route("DELETE", "/v1/snapshots/b0@t/expose", None, exposed) == Forward(1)
    # A LUN made from a snapshot is made (and served) by the snapshot's worker, as is a restore into a new LUN.
    assert route("POST", "/v1/luns", {"name": "n", "from_snapshot": "b0@s"}, WHERE) == Forward(1)
    assert route("POST", "/v1/luns", {"name": "n", "from_snapshot": "a0@s"}, WHERE) == Forward(0)
    assert route("POST", "/v1/recovery/resync", {"pairs": [{"snapshot": "b0@s", "destination": "new"}]},
                 WHERE) == Forward(1, remember_set=True)


def test_sets_stick_to_the_worker_that_made_them() -> None:
    assert route("POST", "/v1/recovery/rs1/recover", {}, WHERE) == Forward(1)
    assert route("GET", "/v1/recovery/unknown", None, WHERE) == FanOut("find")
    assert isinstance(route("POST", "/v1/recovery/rs1/pairs", {"snapshot": "a0@s"}, WHERE), SpansWorkers)
    assert route("POST", "/v1/recovery/rs1/pairs", {"snapshot": "b1@s"}, WHERE) == Forward(1)
    # Into worker 1's LUN from worker 0's snapshot: the set's worker runs it.
    assert route("POST", "/v1/recovery/rs1/pairs", {"snapshot": "a0@s", "destination": "b0"}, WHERE) == Forward(1)
    assert isinstance(route("POST", "/v1/recovery/rs1/pairs", {"snapshot": "b0@s", "destination": "a0"}, WHERE),
                      SpansWorkers)
    # VSS snapshot sets: the first LUN (by its serial) binds the set; a LUN of another worker later spans.
    begin = {"snapshot_id": "x", "luns": [{"serial": "SB0"}]}
    assert route("POST", "/v1/provider/snapshot-sets/vs1/begin-prepare", begin, WHERE) == Forward(1, bind_set="vs1")
    other = routing.Placement(WHERE.target_owner, WHERE.lun_owner, {"vs1": 1}.get, WHERE.serial_lun)
    # A LUN of another worker joins the set on its worker (whose commit asks the control for the snapshots).
    assert route("POST", "/v1/provider/snapshot-sets/vs1/begin-prepare", {"luns": [{"serial_number": "SA0"}]},
                 other) == Forward(1)
    assert route("POST", "/v1/provider/get-target-luns", {"luns": [{"serial": "SA0"}, {"serial": "SB0"}],
                                                          "snapshot_set_id": "vs1"}, other) == Forward(1)
    d = route("POST", "/v1/provider/locate-luns", {"luns": [{"serial": "SA0"}, {"serial_number": "SB0"}]}, other)
    assert d == SpansWorkers(routing.PER_LUN_VSS, {0: ["a0"], 1: ["b0"]}), d  # each worker its own LUNs
    d = route("POST", "/v1/provider/are-luns-supported", {"luns": [{"serial": "SA0"}, {"serial": "SB0"}]}, other)
    assert d == SpansWorkers(routing.PER_LUN_VSS, {0: ["a0"], 1: ["b0"]}), d  # each worker answers for its own
    assert route("POST", "/v1/provider/snapshot-sets/vs1/commit", {}, other) == Forward(1)
    assert route("POST", "/v1/provider/async/rs1/wait", {}, WHERE) == Forward(1)
    # ResyncLuns into LUNs of two workers is a recovery set across workers, which VSS follows by its handle.
    d = route("POST", "/v1/provider/resync-luns", {"source_luns": [{"serial": "SX"}, {"serial": "SY"}],
                                                   "target_luns": [{"serial": "SA0"}, {"serial": "SB0"}]}, WHERE)
    assert d == SpansWorkers(routing.RESYNC_LUNS, {0: ["a0"], 1: ["b0"]}), d
    assert route("POST", "/v1/provider/resync-luns", {"source_luns": [{"serial": "SX"}],
                                                      "target_luns": [{"serial": "SB0"}]}, WHERE) == Forward(
        1, remember_set=True)
    spanning = routing.Placement(WHERE.target_owner, WHERE.lun_owner, WHERE.set_owner, WHERE.serial_lun,
                                 WHERE.exposed_on, {"0123456789ab"}.__contains__)
    assert route("POST", "/v1/provider/async/0123456789ab/wait", {}, spanning) == SpansWorkers(routing.RECOVERY_SET)


def test_only_reads_and_long_calls_run_beside_the_controls_changes() -> None:
    assert not routing.changes_placement("GET", "/v1/luns")
    for path in ("/v1/recovery/rs1/wait", "/v1/recovery/rs1/post-restore", "/v1/provider/async/rs1/wait"):
        assert not routing.changes_placement("POST", path), path
    for path in ("/v1/recovery/rs1/cancel", "/v1/recovery/resync", "/v1/luns", "/v1/targets/iqn.x/luns",
                 "/v1/snapshots", "/v1/luns/wait/grow", "/v1/luns/wait"):  # a LUN named "wait" is any LUN
        assert routing.changes_placement("POST", path), path
    assert routing.changes_placement("DELETE", "/v1/luns/wait")
    assert routing.changes_placement("DELETE", "/v1/recovery/rs1/wait")

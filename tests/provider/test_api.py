"""The management API against the real daemon: auth, every resource, live effects on logins and SCSI, error shapes.

One demo daemon serves the module; each test works on its own targets and LUNs so the tests do not interfere. Live
effects are checked with a hand-driven initiator (``iscsi_scapy.RawInitiator``): a grown LUN raises CAPACITY DATA HAS
CHANGED on a session that already exists, an ACL refuses a login, CHAP is demanded, a forced logout closes the socket.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import struct
from collections.abc import Iterator

import pytest
from api_harness import ApiDaemon, names
from iscsi_scapy import RawInitiator, cdb_read10, cdb_read_capacity10, cdb_test_unit_ready

pytestmark = pytest.mark.e2e

DEMO = "iqn.2026-11.io.lunsync:demo"
MIB = 1 << 20
STATUS_CHECK_CONDITION = 0x02
UNIT_ATTENTION = 0x06
LOGIN_AUTHORIZATION_FAILURE = 0x0202
LOGIN_AUTHENTICATION_FAILURE = 0x0201


def iqn(tag: str) -> str:
    return f"iqn.2026-11.io.lunsync:api-{tag}"


@pytest.fixture
def initiator(api_daemon: ApiDaemon) -> Iterator[RawInitiator]:
    ri = RawInitiator("127.0.0.1", api_daemon.port)
    try:
        yield ri
    finally:
        ri.close()


def clear_unit_attentions(ri: RawInitiator, lun: int) -> None:
    """A new nexus first sees POWER ON, RESET (and maybe others): TEST UNIT READY until GOOD."""
    for _ in range(8):
        if ri.scsi(cdb_test_unit_ready(), lun=lun).status == 0:
            return
    raise AssertionError("TEST UNIT READY never returned GOOD")


def read_capacity_bytes(ri: RawInitiator, lun: int) -> int:
    r = ri.scsi(cdb_read_capacity10(), lun=lun, read_length=8)
    assert r.status == 0, r
    last_lba, block = struct.unpack(">II", r.data[:8])
    return (last_lba + 1) * block


# --- auth ------------------------------------------------------------------------------------------------------------


def test_token_file_is_private(api_daemon: ApiDaemon) -> None:
    st = os.stat(api_daemon.data_dir / "api-token")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert len(api_daemon.token) >= 32


@pytest.mark.parametrize("path", ["/v1/status", "/v1/luns", "/openapi.json", "/v1/no-such-route"])
def test_requests_without_the_token_get_401(api_daemon: ApiDaemon, path: str) -> None:
    mark = api_daemon.log_mark()
    with api_daemon.http(token="") as anon, api_daemon.http(token="not-the-token") as wrong:
        for client, why in ((anon, "no bearer token"), (wrong, "wrong token")):
            r = client.get(path)
            assert r.status_code == 401, r.text
            assert "token" in r.json()["error"]
            assert r.headers["www-authenticate"].startswith("Bearer")
            api_daemon.wait_for_log(rf"refused GET {path} from 127\.0\.0\.1:\d+: {why}", since=mark)
    assert "not-the-token" not in api_daemon.log_since(mark)


def test_unauthenticated_garbage_body_is_still_401_not_422(api_daemon: ApiDaemon) -> None:
    with api_daemon.http(token="") as anon:
        r = anon.post("/v1/luns", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_openapi_document_describes_the_resources(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    for p in ("/v1/targets", "/v1/targets/{iqn}/luns", "/v1/targets/{iqn}/acls", "/v1/targets/{iqn}/chap",
              "/v1/luns", "/v1/luns/{name}/resize", "/v1/sessions", "/v1/sessions/{tsih}", "/v1/portals",
              "/v1/status", "/v1/apply", "/v1/export"):
        assert p in paths, p
    assert any(s.get("scheme") == "bearer" for s in doc["components"]["securitySchemes"].values())
    # Errors are documented with the shape they really have.
    assert paths["/v1/luns"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorOut")


# --- targets ---------------------------------------------------------------------------------------------------------


def test_target_lifecycle(api_daemon: ApiDaemon) -> None:
    name = iqn("Lifecycle")
    with api_daemon.http() as c:
        r = c.post("/v1/targets", json={"iqn": name, "alias": "lc"})
        assert r.status_code == 201, r.text
        assert r.json()["iqn"] == name.lower()  # names are compared, and stored, in lowercase (RFC 3722)
        assert r.json() == {"iqn": name.lower(), "alias": "lc", "acl": [], "luns": [],
                            "chap": {"enabled": False, "user": None, "mutual": False, "mutual_user": None},
                            "sessions": 0}
        dup = c.post("/v1/targets", json={"iqn": name})
        assert dup.status_code == 409 and "already exists" in dup.json()["error"]
        assert name.lower() in names(c.get("/v1/targets").json(), "iqn")
        assert c.get(f"/v1/targets/{name}").status_code == 200
        assert c.delete(f"/v1/targets/{name}").status_code == 204
        gone = c.get(f"/v1/targets/{name}")
        assert gone.status_code == 404 and name.lower() in gone.json()["error"]


@pytest.mark.parametrize("bad", ["iqn.2026-13.io.x:y", "iqn.nodate", "foo.bar", ""])
def test_bad_target_names_are_refused_with_the_reason(api_daemon: ApiDaemon, bad: str) -> None:
    with api_daemon.http() as c:
        r = c.post("/v1/targets", json={"iqn": bad})
    assert r.status_code in (400, 422), r.text
    assert "iqn" in r.json()["error"].lower()


def test_deleting_a_target_that_maps_luns_needs_force(api_daemon: ApiDaemon) -> None:
    t = iqn("force")
    with api_daemon.http() as c:
        assert c.post("/v1/targets", json={"iqn": t}).status_code == 201
        assert c.post("/v1/luns", json={"name": "force0", "size": "8MiB"}).status_code == 201
        assert c.post(f"/v1/targets/{t}/luns", json={"name": "force0"}).status_code == 201
        r = c.delete(f"/v1/targets/{t}")
        assert r.status_code == 409 and "unmap" in r.json()["error"]
        assert c.delete(f"/v1/targets/{t}", params={"force": "true"}).status_code == 204
        assert c.get("/v1/luns/force0").json()["mappings"] == []  # the LUN itself stays


# --- LUNs ------------------------------------------------------------------------------------------------------------


def test_lun_create_makes_a_private_sparse_backing_file(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        r = c.post("/v1/luns", json={"name": "thin0", "size": "64MiB"})
    assert r.status_code == 201, r.text
    lun = r.json()
    assert lun["size_bytes"] == 64 * MIB and lun["size"] == "64MiB" and lun["thin"] and not lun["read_only"]
    assert lun["path"] == "luns/thin0.img" and lun["block_size"] == 512
    assert len(lun["naa"]) == 32 and lun["naa"].startswith("6") and len(lun["serial"]) == 20
    st = os.stat(api_daemon.data_dir / "luns" / "thin0.img")
    assert st.st_size == 64 * MIB
    assert st.st_blocks * 512 < MIB, "a thin LUN must not allocate its blocks"
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_thick_and_read_only_and_4k_luns(api_daemon: ApiDaemon, tmp_path: os.PathLike[str]) -> None:
    outside = os.path.join(tmp_path, "thick.img")
    with api_daemon.http() as c:
        r = c.post("/v1/luns", json={"name": "thick0", "size": 8 * MIB, "thin": False, "block_size": 4096,
                                     "read_only": True, "path": outside})
        assert r.status_code == 201, r.text
        assert r.json()["path"] == outside and not r.json()["thin"] and r.json()["read_only"]
        st = os.stat(outside)
        assert st.st_blocks * 512 >= 8 * MIB, "a thick LUN has every block allocated"
        assert c.delete("/v1/luns/thick0").status_code == 204
    assert os.path.exists(outside), "a backing file outside the data dir belongs to the user and stays"


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"name": "bad0", "size": "10GB"}, 422, "size"),  # refused by the schema (KB/MB/GB are ambiguous)
    ({"name": "bad0", "size": 1000}, 422, "multiple"),
    ({"name": "bad0", "size": "1000B"}, 400, "multiple of the 512-byte block size"),
    ({"name": "bad0", "size": "6KiB", "block_size": 4096}, 400, "4096"),
    ({"name": "bad0", "size": "8MiB", "block_size": 1024}, 422, "block_size"),
    ({"name": "bad/0", "size": "8MiB"}, 422, "name"),
    ({"name": "bad0", "size": "8MiB", "colour": "blue"}, 422, "colour"),
    ({"name": "bad0"}, 422, "size"),
    ({"name": "bad0", "size": "8MiB", "rate_mib_s": 4}, 422, "only with from_snapshot"),
    ({"name": "bad0", "from_snapshot": "demo0@s1", "block_size": 4096}, 422, "block_size: not with from_snapshot"),
    ({"name": "bad0", "from_snapshot": "demo0"}, 422, "not a snapshot name"),
    ({"name": "bad0", "from_snapshot": "nolun@s1"}, 404, "nolun@s1"),
])
def test_bad_lun_requests_name_the_problem(api_daemon: ApiDaemon, body: dict[str, object], status: int,
                                           words: str) -> None:
    with api_daemon.http() as c:
        r = c.post("/v1/luns", json=body)
        assert r.status_code == status, r.text
        assert words in r.json()["error"], r.json()
        assert c.get("/v1/luns/bad0").status_code == 404, "a refused create leaves nothing behind"
    assert not (api_daemon.data_dir / "luns" / "bad0.img").exists()


def test_a_lun_is_served_only_by_the_backend_it_names(api_daemon: ApiDaemon, tmp_path: os.PathLike[str]) -> None:
    plain = os.path.join(tmp_path, "plain.img")
    with open(plain, "wb") as f:
        f.truncate(8 * MIB)
    with api_daemon.http() as c:
        r = c.post("/v1/luns", json={"name": "blk0", "size": "8MiB", "backend": "block", "path": plain})
        assert r.status_code == 400 and "not a block device" in r.json()["error"], r.text
        assert c.get("/v1/luns/blk0").status_code == 404, "a refused create leaves nothing behind"
        r = c.post("/v1/luns", json={"name": "blk0", "size": "8MiB", "backend": "tape"})
        assert r.status_code == 422 and "backend" in r.json()["error"], r.text
        r = c.post("/v1/luns", json={"name": "file0", "size": "8MiB", "path": plain})
        assert r.status_code == 201 and r.json()["backend"] == "file", r.text
        assert c.delete("/v1/luns/file0").status_code == 204


def test_duplicate_lun_is_a_conflict(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        assert c.post("/v1/luns", json={"name": "dup0", "size": "8MiB"}).status_code == 201
        r = c.post("/v1/luns", json={"name": "dup0", "size": "16MiB"})
        assert r.status_code == 409 and "dup0" in r.json()["error"]
        assert c.get("/v1/luns/dup0").json()["size_bytes"] == 8 * MIB


def test_map_unmap_and_delete_rules(api_daemon: ApiDaemon) -> None:
    t = iqn("maps")
    with api_daemon.http() as c:
        assert c.post("/v1/targets", json={"iqn": t}).status_code == 201
        assert c.post("/v1/luns", json={"name": "map0", "size": "8MiB"}).status_code == 201
        m = c.post(f"/v1/targets/{t}/luns", json={"name": "map0", "lun": 5})
        assert m.status_code == 201 and m.json() == {"lun": 5, "name": "map0"}
        again = c.post(f"/v1/targets/{t}/luns", json={"name": "map0"})  # "any number": the one it has will do
        assert again.status_code == 200 and again.json() == {"lun": 5, "name": "map0"}, again.text
        elsewhere = c.post(f"/v1/targets/{t}/luns", json={"name": "map0", "lun": 6})
        assert elsewhere.status_code == 409 and "already mapped" in elsewhere.json()["error"]
        assert c.get(f"/v1/targets/{t}/luns").json() == [{"lun": 5, "name": "map0"}]
        assert c.get("/v1/luns/map0").json()["mappings"] == [{"target": t, "lun": 5}]
        busy = c.delete("/v1/luns/map0")
        assert busy.status_code == 409 and "still mapped" in busy.json()["error"]
        assert c.post(f"/v1/targets/{t}/luns", json={"name": "nosuch"}).status_code == 404
        assert c.delete(f"/v1/targets/{t}/luns/map0").status_code == 204
        assert c.delete(f"/v1/targets/{t}/luns/map0").status_code == 404
        assert c.delete("/v1/luns/map0").status_code == 204
        assert c.get("/v1/luns/map0").status_code == 404
    assert not (api_daemon.data_dir / "luns" / "map0.img").exists()


def test_mapping_is_live_for_report_luns(api_daemon: ApiDaemon, initiator: RawInitiator) -> None:
    t = iqn("live")
    with api_daemon.http() as c:
        assert c.post("/v1/targets", json={"iqn": t}).status_code == 201
        assert c.post("/v1/luns", json={"name": "live0", "size": "4MiB"}).status_code == 201
        assert c.post(f"/v1/targets/{t}/luns", json={"name": "live0", "lun": 2}).status_code == 201
    initiator.login(t)
    clear_unit_attentions(initiator, 2)
    assert read_capacity_bytes(initiator, 2) == 4 * MIB


def test_grow_is_live_and_raises_capacity_data_has_changed(api_daemon: ApiDaemon, initiator: RawInitiator) -> None:
    t = iqn("grow")
    with api_daemon.http() as c:
        assert c.post("/v1/targets", json={"iqn": t}).status_code == 201
        assert c.post("/v1/luns", json={"name": "grow0", "size": "16MiB"}).status_code == 201
        assert c.post(f"/v1/targets/{t}/luns", json={"name": "grow0", "lun": 0}).status_code == 201
        initiator.login(t)
        clear_unit_attentions(initiator, 0)
        assert read_capacity_bytes(initiator, 0) == 16 * MIB

        r = c.post("/v1/luns/grow0/resize", json={"size": "48MiB"})
        assert r.status_code == 200, r.text
        assert r.json()["size_bytes"] == 48 * MIB
        # The session that already knew the old size hears about the new one on its next command.
        tur = initiator.scsi(cdb_test_unit_ready(), lun=0)
        assert tur.status == STATUS_CHECK_CONDITION, tur
        assert tur.sense_key == UNIT_ATTENTION
        assert (tur.sense[12], tur.sense[13]) == (0x2A, 0x09), tur.sense.hex()
        assert read_capacity_bytes(initiator, 0) == 48 * MIB
        assert os.stat(api_daemon.data_dir / "luns" / "grow0.img").st_size == 48 * MIB

        shrink = c.post("/v1/luns/grow0/resize", json={"size": "16MiB"})
        assert shrink.status_code == 400 and "shrink" in shrink.json()["error"]
        assert c.get("/v1/luns/grow0").json()["size_bytes"] == 48 * MIB
        assert c.post("/v1/luns/nosuch/resize", json={"size": "1GiB"}).status_code == 404


# --- ACLs and CHAP ---------------------------------------------------------------------------------------------------


def test_acl_decides_who_logs_in_and_evicts_the_others(api_daemon: ApiDaemon) -> None:
    t = iqn("acl")
    alice, bob = "iqn.2026-11.test:alice", "iqn.2026-11.test:bob"
    with api_daemon.http() as c:
        assert c.post("/v1/targets", json={"iqn": t}).status_code == 201
        with RawInitiator("127.0.0.1", api_daemon.port) as bob_session:
            bob_session.login(t, bob)  # an empty ACL admits anyone
            r = c.post(f"/v1/targets/{t}/acls", json={"initiator": alice.upper()})
            assert r.status_code == 201 and r.json() == [alice]
            assert bob_session.is_closed(timeout=3), "bob's session must end once the ACL leaves him out"
        with RawInitiator("127.0.0.1", api_daemon.port) as ri:
            rsp = ri.login(t, bob, check=False)
            assert rsp.status == LOGIN_AUTHORIZATION_FAILURE
        with RawInitiator("127.0.0.1", api_daemon.port) as ri:
            assert ri.login(t, alice).status == 0
        assert c.get(f"/v1/targets/{t}/acls").json() == [alice]
        assert c.post(f"/v1/targets/{t}/acls", json={"initiator": alice}).status_code == 409
        assert c.post(f"/v1/targets/{t}/acls", json={"initiator": "not-an-iqn"}).status_code == 422
        assert c.delete(f"/v1/targets/{t}/acls/{bob}").status_code == 404
        assert c.delete(f"/v1/targets/{t}/acls/{alice}").status_code == 204
        assert c.get(f"/v1/targets/{t}/acls").json() == []
    with RawInitiator("127.0.0.1", api_daemon.port) as ri:
        assert ri.login(t, bob).status == 0, "an emptied ACL admits anyone again"


def test_chap_secrets_go_in_and_never_come_out(api_daemon: ApiDaemon) -> None:
    t = iqn("chap")
    secret, mutual = "s3cret-Chap-0123", "mutual-Secret-987"
    mark = api_daemon.log_mark()
    with api_daemon.http() as c:
        assert c.post("/v1/targets", json={"iqn": t}).status_code == 201
        r = c.put(f"/v1/targets/{t}/chap", json={"user": "alice", "secret": secret, "mutual_user": "tgt",
                                                   "mutual_secret": mutual})
        assert r.status_code == 200, r.text
        assert r.json() == {"enabled": True, "user": "alice", "mutual": True, "mutual_user": "tgt"}
        texts = [r.text, c.get(f"/v1/targets/{t}/chap").text, c.get(f"/v1/targets/{t}").text,
                 c.get("/v1/targets").text]
        assert all(secret not in x and mutual not in x for x in texts)
        same = c.put(f"/v1/targets/{t}/chap", json={"user": "alice", "secret": "x", "mutual_user": "tgt",
                                                     "mutual_secret": "x"})
        assert same.status_code == 400 and "mutual_secret" in same.json()["error"] and '"x"' not in same.text
        # Live: a login without CHAP is now refused.
        with RawInitiator("127.0.0.1", api_daemon.port) as ri:
            assert ri.login(t, check=False).status == LOGIN_AUTHENTICATION_FAILURE
        assert c.delete(f"/v1/targets/{t}/chap").status_code == 204
        assert c.delete(f"/v1/targets/{t}/chap").status_code == 404
        assert c.get(f"/v1/targets/{t}/chap").json()["enabled"] is False
    with RawInitiator("127.0.0.1", api_daemon.port) as ri:
        assert ri.login(t).status == 0
    log = api_daemon.log_since(mark)
    assert secret not in log and mutual not in log
    assert "chap" in log.lower()


# --- sessions --------------------------------------------------------------------------------------------------------


def test_sessions_show_who_and_what_and_can_be_forced_out(api_daemon: ApiDaemon, initiator: RawInitiator) -> None:
    initiator.login(DEMO, "iqn.2026-11.test:sessions")
    clear_unit_attentions(initiator, 0)
    for _ in range(3):
        assert initiator.scsi(cdb_read10(0, 8), lun=0, read_length=4096).status == 0
    assert initiator.sock is not None
    local = initiator.sock.getsockname()
    with api_daemon.http() as c:
        sessions = [s for s in c.get("/v1/sessions").json() if s["initiator"] == "iqn.2026-11.test:sessions"]
        assert len(sessions) == 1, sessions
        s = sessions[0]
        assert s["address"] == f"{local[0]}:{local[1]}"
        assert s["target"] == DEMO and not s["discovery"] and s["tsih"] == initiator.tsih
        assert s["isid"] == f"{initiator.isid:012x}"
        per_lun = {x["lun"]: x for x in s["luns"]}
        assert per_lun[0]["name"] == "demo0"
        assert per_lun[0]["reads"] == 3 and per_lun[0]["read_bytes"] == 3 * 4096 and per_lun[0]["writes"] == 0

        assert c.delete(f"/v1/sessions/{s['tsih']}").status_code == 204
        assert initiator.is_closed(timeout=3)
        assert s["tsih"] not in names(c.get("/v1/sessions").json(), "tsih")
        gone = c.delete(f"/v1/sessions/{s['tsih']}")
        assert gone.status_code == 404 and str(s["tsih"]) in gone.json()["error"]
        assert c.delete("/v1/sessions/0").status_code == 422


def test_status_and_portals(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        st = c.get("/v1/status").json()
        portals = c.get("/v1/portals").json()
    assert st["api"] == api_daemon.api_url and st["metrics"] == api_daemon.metrics_url
    assert st["data_dir"] == str(api_daemon.data_dir) and st["uptime_s"] > 0 and st["luns"] >= 1
    assert portals == [{"address": f"127.0.0.1:{api_daemon.port}", "host": "127.0.0.1", "port": api_daemon.port,
                        "tpgt": 1}]


# --- error shapes ----------------------------------------------------------------------------------------------------


def test_errors_are_json_objects_naming_the_problem(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        nowhere = c.get("/v1/nowhere")
        assert nowhere.status_code == 404 and "error" in nowhere.json()
        broken = c.post("/v1/targets", content=b"{", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and "json" in broken.json()["error"].lower()
        method = c.put("/v1/luns")
        assert method.status_code == 405 and "error" in method.json()
        for r, code in ((nowhere, "not_found"), (broken, "invalid"), (method, "invalid")):
            assert set(r.json()) == {"error", "code"} and r.json()["code"] == code


def test_apply_and_export_through_the_api(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        exported = c.get("/v1/export").json()["config"]
        assert "[[lun]]" in exported and 'name = "demo0"' in exported
        same = c.post("/v1/apply", json={"config": exported, "dry_run": True})
        assert same.status_code == 200 and same.json() == {"dry_run": True, "changed": False, "plan": [],
                                                           "refused": []}
        bad = c.post("/v1/apply", json={"config": '[[lun]]\nname = "x"\nsize = "1GiB"\nread_onyl = true\n',
                                        "source": "mine.toml"})
        assert bad.status_code == 400 and "read_onyl" in bad.json()["error"] and "mine.toml:" in bad.json()["error"]


def test_apply_names_the_snapshots_that_keep_a_lun_it_would_remove(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        without = c.get("/v1/export").json()["config"]
        assert c.post("/v1/luns", json={"name": "kept0", "size": "4MiB"}).status_code == 201
        for snap in ("kept0@a", "kept0@b"):
            assert c.post("/v1/snapshots", json={"snapshots": [snap]}).status_code == 201
        why = "! lun kept0 cannot be removed, kept by its snapshots (kept0@a, kept0@b): delete them first"
        dry = c.post("/v1/apply", json={"config": without, "dry_run": True})
        assert dry.status_code == 200, dry.text
        assert dry.json() == {"dry_run": True, "changed": False, "plan": [why], "refused": [why]}
        real = c.post("/v1/apply", json={"config": without})
        assert real.status_code == 409 and real.json()["code"] == "conflict", real.text
        assert real.json()["error"] == ("lun 'kept0' cannot be removed: kept by its snapshots (kept0@a, kept0@b): "
                                        "delete them first"), real.text
        assert c.get("/v1/luns/kept0").status_code == 200
        for snap in ("kept0@a", "kept0@b"):
            assert c.delete(f"/v1/snapshots/{snap}").status_code == 204
        done = c.post("/v1/apply", json={"config": without})
        assert done.status_code == 200 and done.json()["plan"] == ["- lun kept0"], done.text
        assert c.get("/v1/luns/kept0").status_code == 404


def test_creates_are_idempotent_for_drivers_that_retry(api_daemon: ApiDaemon) -> None:
    t = iqn("idem")
    with api_daemon.http() as c:
        # The same spec twice: 201, then 200 with the same object.
        first = c.post("/v1/targets", json={"iqn": t, "alias": "a"})
        again = c.post("/v1/targets", json={"iqn": t, "alias": "a"})
        assert (first.status_code, again.status_code) == (201, 200) and first.json() == again.json(), again.text
        other = c.post("/v1/targets", json={"iqn": t, "alias": "b"})
        assert other.status_code == 409 and "different spec" in other.json()["error"] and "alias" in other.json()["error"]

        spec = {"name": "idem0", "size": "8MiB", "block_size": 4096}
        first = c.post("/v1/luns", json=spec)
        again = c.post("/v1/luns", json={**spec, "size": 8 * MIB})  # the same size, spelled in bytes
        assert (first.status_code, again.status_code) == (201, 200), again.text
        assert again.json()["serial"] == first.json()["serial"]
        for change in ({"size": "16MiB"}, {"block_size": 512}, {"thin": False}, {"read_only": True}):
            r = c.post("/v1/luns", json={**spec, **change})
            assert r.status_code == 409 and "different spec" in r.json()["error"], (change, r.text)
        assert c.get("/v1/luns/idem0").json()["size_bytes"] == 8 * MIB

        m1 = c.post(f"/v1/targets/{t}/luns", json={"name": "idem0", "lun": 2})
        m2 = c.post(f"/v1/targets/{t}/luns", json={"name": "idem0", "lun": 2})
        m3 = c.post(f"/v1/targets/{t}/luns", json={"name": "idem0"})
        assert (m1.status_code, m2.status_code, m3.status_code) == (201, 200, 200), (m2.text, m3.text)
        assert m3.json() == {"lun": 2, "name": "idem0"}
        assert c.post(f"/v1/targets/{t}/luns", json={"name": "idem0", "lun": 3}).status_code == 409

        s1 = c.post("/v1/snapshots", json={"snapshots": ["idem0@s"]})
        s2 = c.post("/v1/snapshots", json={"snapshots": ["idem0@s"]})
        assert (s1.status_code, s2.status_code) == (201, 200), s2.text
        assert s2.json()["snapshots"][0]["serial"] == s1.json()["snapshots"][0]["serial"]
        s3 = c.post("/v1/snapshots", json={"snapshots": ["idem0@s"], "kind": "clone"})
        assert s3.status_code == 409 and "kind" in s3.json()["error"], s3.text

        # Deletes: done once, then a distinct 404 a driver can take as "already gone".
        for path in ("/v1/snapshots/idem0@s", f"/v1/targets/{t}/luns/idem0", "/v1/luns/idem0", f"/v1/targets/{t}"):
            assert c.delete(path).status_code == 204, path
            gone = c.delete(path)
            assert gone.status_code == 404 and gone.json()["code"] == "not_found", (path, gone.text)


def _typed(schema: dict[str, object]) -> bool:
    """A schema that says what the body is: a reference, a type, or a union of typed members."""
    if "$ref" in schema or "type" in schema:
        return True
    members = schema.get("anyOf") or schema.get("oneOf")
    return isinstance(members, list) and bool(members) and all(isinstance(m, dict) and _typed(m) for m in members)


def test_every_operation_has_a_typed_response_model_and_a_description(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        doc = c.get("/openapi.json").json()
    missing = []
    ops = 0
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            ops += 1
            name = f"{method.upper()} {path}"
            if not (op.get("description") or "").strip():
                missing.append(f"{name}: no description")
            for status, resp in op["responses"].items():
                content = resp.get("content", {}).get("application/json")
                if status == "204":
                    continue
                if content is None or not _typed(content.get("schema", {})):
                    missing.append(f"{name}: response {status} has no typed model")
            # Every error is the one error schema.
            for status, resp in op["responses"].items():
                if status[0] in "45":
                    ref = resp.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
                    if not ref.endswith("/ErrorOut"):
                        missing.append(f"{name}: error {status} is not ErrorOut")
    assert ops >= 50 and not missing, "\n".join(missing)
    error = doc["components"]["schemas"]["ErrorOut"]
    assert {"error", "code", "hresult"} <= set(error["properties"]) and set(error["required"]) == {"error", "code"}


def _rfc3339(text: str) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(text)
    assert parsed.tzinfo is not None and parsed.utcoffset() == dt.timedelta(0), text
    return parsed


def test_async_work_answers_202_with_the_job_and_rfc3339_times(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        assert c.post("/v1/luns", json={"name": "async0", "size": "8MiB"}).status_code == 201
        clone = c.post("/v1/snapshots", json={"snapshots": ["async0@c"], "kind": "clone"})
        assert clone.status_code == 202 and clone.headers["location"] == "/v1/snapshots/async0@c", clone.text
        watched = c.get(clone.headers["location"])
        assert watched.status_code == 200 and watched.json()["fill"] is not None
        _rfc3339(watched.json()["created_at"])
        plain = c.post("/v1/snapshots", json={"snapshots": ["async0@d"]})
        assert plain.status_code == 201 and "location" not in plain.headers

        dry = c.post("/v1/recovery/resync", json={"pairs": [{"snapshot": "async0@d", "destination": "async1"}],
                                                  "dry_run": True})
        assert dry.status_code == 200 and dry.json()["dry_run"] is True, dry.text
        started = c.post("/v1/recovery/resync", json={"pairs": [{"snapshot": "async0@d", "destination": "async1"}]})
        assert started.status_code == 202, started.text
        where = started.headers["location"]
        assert where == f"/v1/recovery/{started.json()['id']}" and started.json()["handle"]["query"] == where
        done = c.post(f"{where}/wait", params={"timeout_s": 30}).json()
        assert done["state"] == "done", done
        created, began, ended = (_rfc3339(done[k]) for k in ("created_at", "started_at", "finished_at"))
        assert created <= began <= ended
        listed = c.get("/v1/recovery").json()
        assert all(isinstance(s["created_at"], str) for s in listed)
        assert c.delete("/v1/snapshots/async0@d").status_code == 204


def test_a_pool_is_deleted_only_when_nothing_uses_it(api_daemon: ApiDaemon, tmp_path: os.PathLike[str]) -> None:
    where = os.path.join(tmp_path, "spare-pool")
    with api_daemon.http() as c:
        assert c.post("/v1/pools", json={"name": "spare", "path": where, "create": True}).status_code == 201
        assert c.post("/v1/luns", json={"name": "pooled0", "size": "8MiB"}).status_code == 201
        assert c.post("/v1/snapshots", json={"snapshots": ["pooled0@s"], "pool": "spare"}).status_code == 201
        busy = c.delete("/v1/pools/spare")
        assert busy.status_code == 409 and "pooled0@s" in busy.json()["error"], busy.text
        assert c.delete("/v1/snapshots/pooled0@s").status_code == 204
        still = c.delete("/v1/pools/spare")
        assert still.status_code == 409 and "pooled0" in still.json()["error"], still.text  # its copies live there
        assert c.delete("/v1/luns/pooled0").status_code == 204
        default = c.delete("/v1/pools/default")
        assert default.status_code == 409 and "default" in default.json()["error"]
    p = api_daemon.cli("pool", "delete", "spare")
    assert p.returncode == 0 and "deleted pool spare" in p.stdout, p
    with api_daemon.http() as c:
        assert c.get("/v1/pools/spare").status_code == 404
        assert c.delete("/v1/pools/spare").status_code == 404
    assert os.path.isdir(where), "the directory is the operator's: it stays"
    assert api_daemon.cli("pool", "delete", "spare").returncode == 3


def test_a_pool_path_that_does_not_exist_is_refused_unless_asked_to_create_it(api_daemon: ApiDaemon,
                                                                               tmp_path: os.PathLike[str]) -> None:
    where = os.path.join(tmp_path, "typo", "pool")
    a_file = os.path.join(tmp_path, "a-file")
    with open(a_file, "wb"):
        pass
    with api_daemon.http() as c:
        r = c.post("/v1/pools", json={"name": "typo", "path": where})
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith(f"pool path {where} does not exist"), r.text
        assert '"create": true' in r.json()["error"], r.text
        assert not os.path.exists(where)
        assert c.get("/v1/pools/typo").status_code == 404, "a refused pool leaves no record behind"
        r = c.post("/v1/pools", json={"name": "typo", "path": a_file, "create": True})
        assert r.status_code == 400 and "is not a directory" in r.json()["error"], r.text
        r = c.post("/v1/pools", json={"name": "typo", "path": where, "create": True})
        assert r.status_code == 201 and r.json()["path"] == where, r.text
    assert os.path.isdir(where)


def test_the_read_only_token_reads_and_may_not_change(api_daemon: ApiDaemon) -> None:
    path = api_daemon.data_dir / "api-token-readonly"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ro = path.read_text().strip()
    assert len(ro) >= 32 and ro != api_daemon.token
    with api_daemon.http(token=ro) as c:
        for read in ("/v1/status", "/v1/luns", "/v1/pools", "/v1/recovery", "/openapi.json"):
            assert c.get(read).status_code == 200, read
        for method, where, body in (("POST", "/v1/targets", {"iqn": iqn("ro")}), ("DELETE", "/v1/luns/demo0", None),
                                    ("POST", "/v1/snapshots", {"snapshots": ["demo0@ro"]})):
            r = c.request(method, where, json=body)
            assert r.status_code == 403 and r.json()["code"] == "forbidden", (method, where, r.text)
    with api_daemon.http() as c:
        assert c.get(f"/v1/targets/{iqn('ro')}").status_code == 404
        assert c.get("/v1/snapshots/demo0@ro").status_code == 404
    env = {"LUNSYNC_TOKEN": ro}
    assert api_daemon.cli("lun", "list", env=env).returncode == 0
    p = api_daemon.cli("target", "create", iqn("ro"), env=env)
    assert p.returncode == 6 and "read-only token" in p.stderr, p


def test_labels_on_luns_and_snapshots_are_set_changed_and_filtered(api_daemon: ApiDaemon) -> None:
    with api_daemon.http() as c:
        spec = {"name": "lab0", "size": "8MiB", "labels": {"env": "prod", "app.io/tier": "db"}}
        r = c.post("/v1/luns", json=spec)
        assert r.status_code == 201 and r.json()["labels"] == {"app.io/tier": "db", "env": "prod"}, r.text
        assert c.post("/v1/luns", json=spec).status_code == 200, "the same labels are the same spec"
        r = c.post("/v1/luns", json={**spec, "labels": {"env": "test"}})
        assert r.status_code == 409 and "labels" in r.json()["error"], r.text
        assert c.post("/v1/luns", json={"name": "lab1", "size": "8MiB", "labels": {"env": "test"}}).status_code == 201

        def luns(*filters: str) -> list[str]:
            r = c.get("/v1/luns", params=[("label", f) for f in filters])
            assert r.status_code == 200, r.text
            return [x["name"] for x in r.json() if x["name"].startswith("lab")]

        assert luns() == ["lab0", "lab1"]
        assert luns("env=prod") == ["lab0"]
        assert luns("env=prod", "app.io/tier=db") == ["lab0"]
        assert luns("env=prod", "app.io/tier=web") == [], "several filters must all match"
        r = c.get("/v1/luns", params={"label": "noequals"})
        assert r.status_code == 422 and "key=value" in r.json()["error"], r.text

        r = c.patch("/v1/luns/lab1/labels", json={"set": {"env": "prod", "owner": "ops"}})
        assert r.status_code == 200 and r.json()["labels"] == {"env": "prod", "owner": "ops"}, r.text
        r = c.patch("/v1/luns/lab1/labels", json={"remove": ["owner", "absent"]})
        assert r.json()["labels"] == {"env": "prod"}, r.text
        assert luns("env=prod") == ["lab0", "lab1"]
        assert c.patch("/v1/luns/nosuch/labels", json={"set": {"a": "b"}}).status_code == 404

        for bad, words in (({"bad key": "x"}, "label key 'bad key' is not valid"),
                           ({"k": "v" * 64}, "value"), ({"k" * 64: "v"}, "label key")):
            r = c.patch("/v1/luns/lab1/labels", json={"set": bad})
            assert r.status_code == 422 and words in r.json()["error"], (bad, r.text)
            assert "Value error" not in r.json()["error"], r.text
            r = c.post("/v1/luns", json={"name": "lab2", "size": "8MiB", "labels": bad})
            assert r.status_code == 422 and words in r.json()["error"], (bad, r.text)
        assert c.get("/v1/luns/lab2").status_code == 404
        assert c.get("/v1/luns/lab1").json()["labels"] == {"env": "prod"}, "a refused change changes nothing"

        snap = {"snapshots": ["lab0@nightly", "lab1@nightly"], "labels": {"keep": "7d"}}
        r = c.post("/v1/snapshots", json=snap)
        assert r.status_code == 201 and [s["labels"] for s in r.json()["snapshots"]] == [{"keep": "7d"}] * 2, r.text
        assert c.post("/v1/snapshots", json=snap).status_code == 200
        r = c.post("/v1/snapshots", json={**snap, "labels": {}})
        assert r.status_code == 409 and "labels" in r.json()["error"], r.text
        assert c.post("/v1/snapshots", json={"snapshots": ["lab0@hourly"]}).status_code == 201
        r = c.patch("/v1/snapshots/lab0@hourly/labels", json={"set": {"keep": "1d"}})
        assert r.status_code == 200 and r.json()["labels"] == {"keep": "1d"}, r.text

        def snaps(*filters: str, **params: str) -> list[str]:
            r = c.get("/v1/snapshots", params=[*params.items(), *(("label", f) for f in filters)])
            assert r.status_code == 200, r.text
            return sorted(x["name"] for x in r.json())

        assert snaps("keep=7d") == ["lab0@nightly", "lab1@nightly"]
        assert snaps("keep=7d", lun="lab0") == ["lab0@nightly"]
        assert snaps("keep=1d") == ["lab0@hourly"]
        r = c.patch("/v1/snapshots/lab0@hourly/labels", json={"set": {"x": "1"}, "remove": ["x"]})
        assert r.status_code == 400 and "both set and removed" in r.json()["error"], r.text
        for name in ("lab0@nightly", "lab1@nightly", "lab0@hourly"):
            assert c.delete(f"/v1/snapshots/{name}").status_code == 204
        for name in ("lab0", "lab1"):
            assert c.delete(f"/v1/luns/{name}").status_code == 204
